"""The corpus-level neighbourhoods of victim embeddings: reading the embeddings folder (corpus.py), the FAISS
index (index.py) and the statistics over every sample's nearest neighbours (geometry.py). The stage that runs
them is dede_core.stages.neighbours."""
