"""Selective scan speed and memory: the pure-PyTorch scans vs the sequential reference, plus the
mtmamba decoder vs HPS (images/s, parameters, FLOPs) on ResNet-18 at 128x160.

The scans: "reference" (`selective_scan_reference`, the sequential loop), "chunked" (the old default,
`selective_scan_chunked`: autograd through the chunked scan, block checkpointing) and "recompute"
(the default on CPU, `selective_scan_recompute`: chunk-boundary states saved, chunks recomputed in
the backward); "new/old" is recompute time / chunked time.

    OMP_NUM_THREADS=1 python benchmarks/bench_selective_scan.py [--lengths 1024 4096] [--skip-decoder]

Each scan measurement runs in a fresh process so that its peak memory (max RSS above the process's
state after building the inputs; CUDA: max_memory_allocated) is its own.  Timings are the median
of `--repeats` runs after one warm-up.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import time

import torch

B, D, N = 2, 192, 16


def _inputs(length: int, device: str, grad: bool):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, D, length, generator=g)
    delta = torch.randn(B, D, length, generator=g) - 2.0
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(D, 1)
    Bm, Cm = torch.randn(B, N, length, generator=g), torch.randn(B, N, length, generator=g)
    Dv, bias = torch.ones(D), torch.randn(D, generator=g) * 0.1
    tensors = [t.to(device).requires_grad_(grad) for t in (u, delta, A, Bm, Cm, Dv, bias)]
    return tensors


def _measure(kind: str, length: int, backward: bool, repeats: int, device: str, queue) -> None:
    torch.set_num_threads(1)
    from mtvision.models.ssm.selective_scan import (
        selective_scan_chunked,
        selective_scan_recompute,
        selective_scan_reference,
    )

    fn = {"reference": selective_scan_reference, "chunked": selective_scan_chunked, "recompute": selective_scan_recompute}[kind]
    u, delta, A, Bm, Cm, Dv, bias = _inputs(length, device, backward)

    def run() -> None:
        with torch.set_grad_enabled(backward):
            y = fn(u, delta, A, Bm, Cm, Dv, delta_bias=bias, delta_softplus=True)
            if backward:
                y.square().mean().backward()
        if device == "cuda":
            torch.cuda.synchronize()

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up, and the peak memory of one call
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    )
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    queue.put((statistics.median(times), peak))


def scan_table(lengths: list[int], repeats: int, device: str) -> None:
    ctx = mp.get_context("spawn")
    print(f"selective scan, B={B} D={D} N={N} float32 on {device} (1 thread), median of {repeats}")
    print(
        f"{'L':>6} {'pass':>9} {'reference ms':>13} {'chunked ms':>11} {'recompute ms':>13} {'new/old':>8} "
        f"{'speed-up':>9} {'ref MiB':>8} {'chunk MiB':>9} {'recomp MiB':>10}"
    )
    for length in lengths:
        for backward in (False, True):
            row = {}
            for kind in ("reference", "chunked", "recompute"):
                queue = ctx.Queue()
                proc = ctx.Process(target=_measure, args=(kind, length, backward, repeats, device, queue))
                proc.start()
                row[kind] = queue.get()
                proc.join()
            (t_ref, m_ref), (t_ch, m_ch), (t_re, m_re) = row["reference"], row["chunked"], row["recompute"]
            name = "fwd+bwd" if backward else "fwd"
            print(
                f"{length:>6} {name:>9} {t_ref * 1e3:>13.1f} {t_ch * 1e3:>11.1f} {t_re * 1e3:>13.1f} {t_re / t_ch:>8.2f} "
                f"{t_ref / t_re:>8.1f}x {m_ref:>8.0f} {m_ch:>9.0f} {m_re:>10.0f}"
            )
    print("(speed-up: reference / recompute)")


def decoder_table(repeats: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from mtvision.models import create_model

    tasks = {"semseg": 13, "depth": None, "normals": None, "edge": None}
    variants = {
        "hps": ("hps", {}),
        "mtmamba++ (synthetic config: 2 stages, 64 ch)": ("mtmamba", {"stages": 2, "channels": 64}),
        "mtmamba++ (paper: 3 stages, backbone widths)": ("mtmamba", {}),
        "mtmamba (F-CTM, 3 stages)": ("mtmamba", {"variant": "mtmamba"}),
    }
    x = torch.randn(2, 3, 128, 160)
    print("\ndecoders on resnet18 (pretrained: false), 4 tasks, 128x160, batch 2, eval, 1 thread")
    print(f"{'model':<48} {'params M':>9} {'decoder M':>10} {'GFLOP/img':>10} {'img/s':>7}")
    for name, (decoder, options) in variants.items():
        torch.manual_seed(0)
        model = create_model(backbone="resnet18", decoder=decoder, tasks=tasks, decoder_options=options).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        dec = params - sum(p.numel() for p in model.decoder.backbone.parameters()) / 1e6
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                model(x[:1])
            model(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
        ips = x.shape[0] / statistics.median(times)
        print(f"{name:<48} {params:>9.2f} {dec:>10.2f} {counter.get_total_flops() / 1e9:>10.2f} {ips:>7.2f}")
    print("(FLOPs count matmuls and convolutions only: the scan's elementwise exp/cumsum work is not included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-decoder", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scan_table(args.lengths, args.repeats, args.device)
    if not args.skip_decoder:
        decoder_table(args.repeats)


if __name__ == "__main__":
    main()
