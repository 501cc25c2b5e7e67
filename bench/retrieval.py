"""Time and peak host memory of the retrieval metrics at 10k, 100k and 1M items, width 768.

    python bench/retrieval.py                    # float32, the default table (~2-3 min on 2 cores)
    python bench/retrieval.py --dtype bfloat16   # the same in bfloat16
    python bench/retrieval.py --cases topk-1m    # one case

Ranking every caption against every image is quadratic: 1M x 1M at width 768 is 1.5 PFLOP, weeks on
a 2-core CPU. So the full metrics run at 10k images (x 5 captions); at 100k and 1M we time the two
parts that scale with the gallery, for 1,000 queries each:
  ranks-N  positive_ranks: 1,000 captions, the rank of each one's image among N images
           (the inner loop of retrieval_metrics' text_to_image direction, its memory O(block x N));
  topk-N   top_k_search: the 10 best of N gallery items for 1,000 queries.
Each case runs in a fresh process so peaks do not leak between cases. Peak RSS is the process's
high-water mark; "added" is that peak minus the RSS just before the timed call, with the random
embeddings already in memory (their size is printed as "data"). Wall time includes the one
compile per block shape (well under a second). Embeddings are random normal: speed and memory do not
depend on their values.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

WIDTH = 768
NUM_QUERIES = 1000
CASES = {
    # name: (kind, gallery size)
    "metrics-10k": ("metrics", 10_000),
    "ranks-10k": ("ranks", 10_000),
    "topk-10k": ("topk", 10_000),
    "ranks-100k": ("ranks", 100_000),
    "topk-100k": ("topk", 100_000),
    "ranks-1m": ("ranks", 1_000_000),
    "topk-1m": ("topk", 1_000_000),
}
CAPTIONS_PER_IMAGE = 5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Resets the kernel's high-water mark (Linux >= 4.0) so data generation is not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(name: str, dtype_name: str) -> dict:
    """Runs one case in this process and returns its figures."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from siglip_jax.evaluation import retrieval
    from siglip_jax.inference import blockwise

    kind, gallery_size = CASES[name]
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16 if dtype_name == "bfloat16" else np.float32

    def random_embeddings(rows):
        return np.asarray(rng.standard_normal((rows, WIDTH), dtype=np.float32), dtype=dtype)

    if kind == "metrics":
        images = random_embeddings(gallery_size)
        texts = random_embeddings(gallery_size * CAPTIONS_PER_IMAGE)
        caption_image_ids = np.repeat(np.arange(gallery_size), CAPTIONS_PER_IMAGE)
        data_bytes = images.nbytes + texts.nbytes
        run = lambda: retrieval.retrieval_metrics(images, texts, caption_image_ids)  # noqa: E731
        flops = 2 * 2 * images.shape[0] * texts.shape[0] * WIDTH
        what = f"retrieval_metrics, {gallery_size:,} images x {texts.shape[0]:,} captions, both directions"
    else:
        gallery = random_embeddings(gallery_size)
        queries = random_embeddings(NUM_QUERIES)
        data_bytes = gallery.nbytes + queries.nbytes
        flops = 2 * NUM_QUERIES * gallery_size * WIDTH
        if kind == "ranks":
            targets = rng.integers(0, gallery_size, NUM_QUERIES)
            owners = np.arange(gallery_size)
            run = lambda: blockwise.positive_ranks(queries, targets, gallery, owners)  # noqa: E731
            block = blockwise.balanced_block_size(NUM_QUERIES, blockwise.auto_block_size(gallery_size))
            what = f"positive_ranks, {NUM_QUERIES:,} queries vs {gallery_size:,} items (block {block})"
        else:
            run = lambda: blockwise.top_k_search(queries, gallery, k=10)  # noqa: E731
            what = f"top_k_search k=10, {NUM_QUERIES:,} queries vs {gallery_size:,} items"

    rss_before = _rss_bytes()
    reset = _reset_peak_rss()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    peak = _peak_rss_bytes() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"case": name, "what": what, "dtype": dtype_name, "wall_s": wall, "gflops": flops / wall / 1e9,
            "data_gib": data_bytes / 2**30, "peak_rss_gib": peak / 2**30,
            "added_gib": max(peak - rss_before, 0) / 2**30, "backend": jax.default_backend(),
            "devices": jax.device_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {list(CASES)}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case and print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.dtype)))
        return

    names = [name for name in args.cases.split(",") if name]
    unknown = [name for name in names if name not in CASES]
    if unknown:
        sys.exit(f"Unknown case(s) {unknown}; choose from {list(CASES)}.")
    print(f"width {WIDTH}, {args.dtype} embeddings, scores accumulated in float32; one process per case")
    print(f"{'case':<12} {'wall s':>8} {'GFLOP/s':>8} {'data GiB':>9} {'peak RSS GiB':>13} {'added GiB':>10}  what")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for name in names:
        completed = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name, "--dtype", args.dtype],
                                   capture_output=True, text=True, env=env)
        if completed.returncode != 0:
            print(f"{name:<12} failed:\n{completed.stderr[-2000:]}")
            continue
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        print(f"{name:<12} {row['wall_s']:8.2f} {row['gflops']:8.0f} {row['data_gib']:9.2f} "
              f"{row['peak_rss_gib']:13.2f} {row['added_gib']:10.2f}  {row['what']}", flush=True)
    print(f"backend: {row['backend']} ({row['devices']} device(s)), {os.cpu_count()} CPU core(s) visible")


if __name__ == "__main__":
    main()
