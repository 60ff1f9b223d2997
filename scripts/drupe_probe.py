"""One DRUPE-style fine-tune of the cached benchmark encoder: its ASR and a k-NN AUROC (docs/results/detection-summary.md)."""
import torch
from pathlib import Path
from dede_core.attacks import apply_trigger
from dede_core.victims import evaluate_victim, fashion_mnist_32
from dede_core.victims import _load_backbone, _normalize
from dede_core.attacks.badencoder import BackdoorConfig, backdoor_encoder
from dede_core import baselines, metrics
torch.set_num_threads(1)
tx, ty = fashion_mnist_32("train"); sx, sy = fashion_mnist_32("test")
clean = _load_backbone(Path("cache/simclr-3e252893e1af/encoder-e4.pt"), 16)
refs = tx[30000:][ty[30000:] == 0][:10]
trig = lambda u: apply_trigger("patch", u)
cfg = BackdoorConfig(trigger="patch", drupe=True, shadow_images=2000, epochs=4, batch_size=64, lr=1e-3)
bad = backdoor_encoder(clean, normalize=_normalize, shadow_u8=tx[35000:], reference_u8=refs, trigger=trig, config=cfg, log=lambda s: None)
torch.save(bad.state_dict(), "/tmp/drupe.pt")
print(evaluate_victim(Path("/tmp/drupe.pt"), 16, trigger="patch", target=0, train_images=5000, test_images=1000))
from dede_core.ssl import embed_all
enc = lambda x: bad(_normalize(x))
with torch.no_grad():
    bank = embed_all(enc, tx[50000:52000]); c = sx[:1000][sy[:1000]!=0]
    neg = embed_all(enc, c); pos = embed_all(enc, trig(c))
k = baselines.knn_distance(bank, torch.cat([neg,pos]), k=10)
print("knn auroc", metrics.auroc(k[:len(neg)], k[len(neg):]))
