"""MNIST test negative ELBO and importance-weighted NLL, compared with Burda et al. (2015).

Setting (chosen to match the published one, so the numbers compare like with like):

* model ``mlp`` (default): Burda et al.'s one-stochastic-layer architecture,
  784-200-200-50 encoder (tanh), 50 Gaussian latent units, 50-200-200-784 decoder (tanh),
  Bernoulli likelihood on logits. (``--model cnn`` uses vaeflow's MNIST CNN VAE preset,
  ``cnn_vae`` / ``preset: mnist``, where this checkout has it; that one is NOT the published
  architecture: 128 latents, conv layers.)
* data: real MNIST IDX files (``../shared/data/mnist`` relative to the repo root), the 60,000
  training images (6 held out, as prepare refuses an empty validation split; the paper holds
  out none), **dynamic binarization**
  (a fresh Bernoulli(pixel) draw every time an image is read, vaeflow's
  ``data.binarize: dynamic``); the 10,000 t10k test images binarized **once** with a fixed
  seed so every estimate scores the same binary test set.
* objective: the standard ELBO (k = 1), Adam (lr 1e-3 -> 1e-4 cosine), batch 100.
* evaluation: ``vaeflow.evaluate.evaluate_model`` (the code behind ``eval/metrics.json``):
  negative ELBO (analytic KL + MC reconstruction over the k draws) and the IWAE bound
  -log (1/k) sum p(x, z_i) / q(z_i | x) with k = ``--iw-samples`` (5000 as in the paper).

Published (Burda et al. 2015, Table 1, MNIST, one stochastic layer, NLL estimated with
k = 5000): VAE (k = 1) 86.76 nats; IWAE (k = 50) 84.78 nats. Those models trained for 3,280
epochs; a CPU run here trains far fewer, so expect a few nats worse (the table says how many
epochs were run).

    # the reported run (2 CPU cores):
    PYTHONPATH=src python benchmarks/mnist_nll.py --epochs 100 --iw-samples 5000
    # a quick check that everything works (about a minute):
    PYTHONPATH=src python benchmarks/mnist_nll.py --epochs 1 --limit 2000 --test-limit 200 --iw-samples 100
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO / "src"))
import vaeflow  # noqa: E402

if isinstance(vaeflow.__path__, list) and str(_REPO / "src" / "vaeflow") not in vaeflow.__path__:
    vaeflow.__path__.insert(0, str(_REPO / "src" / "vaeflow"))  # this checkout, not an installed copy

from vaeflow.data import PreparedDataset, prepare_dataset  # noqa: E402
from vaeflow.evaluate import evaluate_model  # noqa: E402
from vaeflow.models.base import AEOutput, DiagonalGaussian  # noqa: E402

BURDA = {"VAE (k=1), 1 stochastic layer": 86.76, "IWAE (k=50), 1 stochastic layer": 84.78}


class MLPVAE(nn.Module):
    """Burda et al. (2015) one-stochastic-layer VAE, with vaeflow's autoencoder protocol."""

    input_range = "unit"

    def __init__(self, image_shape=(1, 28, 28), hidden: int = 200, latent: int = 50):
        super().__init__()
        d = math.prod(image_shape)
        self.image_shape = tuple(image_shape)
        self.latent = latent
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, d))

    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean=mean, logvar=logvar)

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.image_shape)

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decode_logits(z))

    def ae_forward(self, x: torch.Tensor, sample_posterior: bool = True) -> AEOutput:
        post = self.posterior(x)
        z = post.sample() if sample_posterior else post.mode()
        return AEOutput(recon=self.decode_latent(z), posterior=post)

    def encode_latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.posterior(x).mode()

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.latent,)

    def sample_prior(self, n: int, generator=None) -> torch.Tensor:
        return torch.randn((n, self.latent), generator=generator)


def build(name: str):
    if name == "mlp":
        return MLPVAE()
    from vaeflow.models import build_model

    try:
        return build_model({"type": "cnn_vae", "preset": "mnist"})
    except (ImportError, ModuleNotFoundError, ValueError, TypeError) as exc:
        raise SystemExit(f"--model cnn needs vaeflow's cnn_vae model (not in this checkout: {exc})")


def elbo_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Negative ELBO per image (Bernoulli likelihood), averaged over the batch."""
    out = model.ae_forward(x, sample_posterior=True)
    post = out.posterior
    if hasattr(model, "decode_logits"):
        z = post.sample()
        rec = nn.functional.binary_cross_entropy_with_logits(model.decode_logits(z), x, reduction="none")
    else:
        rec = nn.functional.binary_cross_entropy(out.recon.clamp(1e-6, 1 - 1e-6), x, reduction="none")
    return (rec.flatten(1).sum(1) + post.kl()).mean()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str((_REPO / ".." / "shared" / "data" / "mnist").resolve()))
    p.add_argument("--work", default="results/benchmarks/mnist_nll", help="prepared data, model and results")
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument("--iw-samples", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: these small matrix ops gain little from a second thread, "
                        "and OpenMP spin-waits make them many times slower when the cores are shared)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    t_all = time.perf_counter()

    data_dir = work / "data"
    data_cfg = {"dataset": "mnist", "root": args.data_root, "image_size": 28, "channels": 1, "download": False,
                "split": {"val": 1e-4, "test": 0.1, "official": True}, "binarize": "dynamic", "split_seed": 0}
    manifest_path = data_dir / "manifest.json"
    if not manifest_path.exists():
        prepare_dataset(data_cfg, data_dir)
    train = PreparedDataset(data_dir, "train", binarize="dynamic", seed=args.seed)
    test = PreparedDataset(data_dir, "test", binarize="static", seed=args.seed)
    n_train = len(train) if args.limit is None else min(args.limit, len(train))
    print(f"MNIST: {n_train} training images (dynamic binarization), {len(test)} test images "
          f"(one fixed Bernoulli draw, seed {args.seed}); torch threads {torch.get_num_threads()}", flush=True)

    model = build(args.model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, args.epochs), eta_min=args.lr / 10)
    g = torch.Generator().manual_seed(args.seed)
    t_train = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n_train, generator=g).tolist()
        tot, seen, t0 = 0.0, 0, time.perf_counter()
        for s in range(0, n_train, args.batch_size):
            x = torch.stack(train.__getitems__(order[s : s + args.batch_size]))
            loss = elbo_loss(model, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * x.shape[0]
            seen += x.shape[0]
        sched.step()
        print(f"epoch {epoch + 1}/{args.epochs}: train -ELBO {tot / seen:.2f} nats ({time.perf_counter() - t0:.1f}s)", flush=True)
    train_s = time.perf_counter() - t_train

    model.eval()
    test_limit = args.test_limit
    test_eval = test if test_limit is None else torch.utils.data.Subset(test, range(min(test_limit, len(test))))
    if test_limit is not None:  # Subset loses __getitems__ / split; give it the batched read back
        test_eval.__getitems__ = lambda idx: test.__getitems__(list(idx))
        test_eval.split = "test"
    t_eval = time.perf_counter()
    m = evaluate_model(model, test_eval, eval_cfg={"iw_samples": args.iw_samples, "batch_size": 1000,
                                                   "likelihood": "bernoulli"}, seed=args.seed)
    eval_s = time.perf_counter() - t_eval
    nll = m["nll"]
    result = {
        "model": "MLP VAE 784-200-200-50 (Burda et al. 2015, one stochastic layer)" if args.model == "mlp"
        else "vaeflow cnn_vae preset mnist",
        "objective": "ELBO (k=1)",
        "epochs": args.epochs,
        "train_images": n_train,
        "test_images": nll["images"],
        "binarization": "dynamic (train); one fixed seeded Bernoulli draw (test)",
        "likelihood": nll["likelihood"],
        "iw_samples": nll["iw_samples"],
        "test_neg_elbo_nats": nll["neg_elbo_nats"],
        "test_iw_nll_nats": nll["iw_nll_nats"],
        "test_neg_elbo_bpd": nll["neg_elbo_bpd"],
        "test_iw_nll_bpd": nll["iw_nll_bpd"],
        "kl_nats": nll["kl_nats"],
        "active_units": m["active_units"]["count"],
        "psnr": m["psnr"],
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(eval_s, 1),
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "torch_threads": torch.get_num_threads(),
        "command": "python benchmarks/mnist_nll.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "published": BURDA,
    }
    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    torch.save(model.state_dict(), work / "model.pt")
    print(json.dumps(result, indent=2))
    print()
    print("| model | epochs | test -ELBO (nats) | test NLL, IW k=%d (nats) |" % nll["iw_samples"])
    print("| --- | --- | --- | --- |")
    print(f"| vaeflow {args.model} VAE (this run) | {args.epochs} | {nll['neg_elbo_nats']:.2f} | {nll['iw_nll_nats']:.2f} |")
    print("| Burda et al. 2015 VAE (k=1) | 3280 | - | 86.76 |")
    print("| Burda et al. 2015 IWAE (k=50) | 3280 | - | 84.78 |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
