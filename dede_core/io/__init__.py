"""Reading and writing: storage (local or fsspec, one atomic write), corpus sources, source index, images, and
the one decode Dataset every stage and benchmark uses."""
