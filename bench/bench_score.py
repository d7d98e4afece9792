"""Benchmarks for batch scoring (not run by the tests; each prints its figures).

    python bench/bench_score.py speed   # MiniLM classifier: the job vs transformers.pipeline(batch_size=32)
    python bench/bench_score.py scale   # tiny model: rows/s and peak memory as the corpus grows 10x
    python bench/bench_score.py gpu     # bert-base-shaped model, bf16, on the GPUs of this machine
    python bench/bench_score.py whole   # `jobs/score.py` with default flags vs a pipeline script, whole processes
    python bench/bench_score.py whole --precision int8   # the same, the job in int8 (raysst.quantize)
    python bench/bench_score.py agree --model DIR   # a trained model: int8 labels against fp32, accuracy of each
    python bench/bench_score.py bigfile # one 1M-row parquet file: rows/s, peak RSS, time by stage; kill at 50%, rerun

The job's rows/s include starting its actors and loading the model (not starting Ray); the pipeline's
include only inference. Both run in the same process, one after the other, `--repeats` times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from raysst.config import PACKAGED_MINILM, PRECISIONS, Config  # noqa: E402
from raysst.proctree import ProcessTree  # noqa: E402
from raysst.score import read_scored, score_driver_fn  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def sst2_sentences(n: int, seed: int = 0) -> list[str]:
    """All validation sentences, then a seeded sample of train phrases, repeated if n asks for more."""
    val = pd.read_parquet(SST2 / "validation.parquet").sentence.tolist()
    train = pd.read_parquet(SST2 / "train.parquet").sentence.sample(frac=1.0, random_state=seed).tolist()
    pool = val + train
    return (pool * (n // len(pool) + 1))[:n]


def write_corpus(texts: list[str], directory: Path, rows_per_file: int) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(range(0, len(texts), rows_per_file)):
        chunk = texts[start:start + rows_per_file]
        pd.DataFrame({"sentence": chunk, "idx": np.arange(start, start + len(chunk))}).to_parquet(
            directory / f"part-{i:04d}.parquet")
    return str(directory)


def minilm_classifier(directory: Path) -> str:
    """The packaged MiniLM with a seeded random 2-label head, saved so both contenders load the same weights."""
    import torch

    from raysst.models import load_classifier, load_tokenizer

    torch.manual_seed(0)
    load_classifier(PACKAGED_MINILM).save_pretrained(directory)
    load_tokenizer(PACKAGED_MINILM).save_pretrained(directory)
    return str(directory)


def run_job(cfg: Config, output: Path) -> dict:
    t0 = time.perf_counter()
    summary = score_driver_fn(cfg.replace(output=str(output)))
    summary["measured_seconds"] = time.perf_counter() - t0
    return summary


def load() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


def bench_speed(args, work: Path) -> None:
    import torch
    from transformers import pipeline

    texts = sst2_sentences(args.rows)
    model = minilm_classifier(work / "minilm")
    corpus = write_corpus(texts, work / "speed_in", rows_per_file=args.rows_per_file)
    cfg = Config(model=model, input=corpus, output=str(work / "unused"), num_actors=args.num_workers,
                 cpus_per_worker=args.cpus_per_worker, eval_batch_size=args.batch_size)
    print(f"speed: {len(texts):,} SST-2 sentences (mean {np.mean([len(t.split()) for t in texts]):.1f} words), "
          f"{os.cpu_count()} CPUs; job: {cfg.num_actors} actor(s) x {cfg.cpus_per_worker} threads, "
          f"batch {cfg.eval_batch_size}; {load()}", flush=True)
    torch.set_num_threads(os.cpu_count())
    pipe_rates, job_rates, cpu_ratios = [], [], []
    for rep in range(args.repeats):
        clf = pipeline("text-classification", model=model, batch_size=32, device="cpu")
        with ProcessTree() as pipe_cpu:
            t0 = time.perf_counter()
            pipe_labels = [r["label"] for r in clf(texts)]
            pipe_rates.append(len(texts) / (time.perf_counter() - t0))
        del clf
        with ProcessTree() as job_cpu:
            summary = run_job(cfg, work / f"speed_out_{rep}")
        job_rates.append(summary["rows_per_second"])
        cpu_ratios.append(pipe_cpu.cpu_seconds / job_cpu.cpu_seconds)
        agree = np.mean(read_scored(str(work / f"speed_out_{rep}")).label.to_numpy() == np.array(pipe_labels))
        print(f"  run {rep + 1}: pipeline {pipe_rates[-1]:,.0f} rows/s ({pipe_cpu.cpu_seconds:.0f} CPU s) | job "
              f"{job_rates[-1]:,.0f} rows/s (wall {summary['wall_seconds']:.1f} s incl. actor start and model load; "
              f"{job_cpu.cpu_seconds:.0f} CPU s, all Ray processes) | ratio {job_rates[-1] / pipe_rates[-1]:.2f}x | "
              f"labels agree {agree:.2%} | {load()}", flush=True)
    ratio = statistics.median(j / p for j, p in zip(job_rates, pipe_rates))
    print(f"speed: median pipeline {statistics.median(pipe_rates):,.0f} rows/s, median job "
          f"{statistics.median(job_rates):,.0f} rows/s, median ratio {ratio:.2f}x (target >= 2x); "
          f"CPU seconds pipeline/job {statistics.median(cpu_ratios):.2f}x", flush=True)


def bench_scale(args, work: Path) -> None:
    from raysst.models import make_random_model

    model = make_random_model(str(work / "tiny"), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=128)
    cfg = Config(model=model, input="unused", output="unused", num_actors=args.num_workers,
                 cpus_per_worker=args.cpus_per_worker, eval_batch_size=args.batch_size)
    print(f"scale: tiny BERT, {args.scale_rows:,} then {args.scale_rows * 10:,} rows in files of "
          f"{args.rows_per_file:,}; {load()}", flush=True)
    for n in (args.scale_rows, args.scale_rows * 10):
        corpus = write_corpus(sst2_sentences(n), work / f"scale_in_{n}", rows_per_file=args.rows_per_file)
        with ProcessTree() as mem:
            summary = run_job(cfg.replace(input=corpus), work / f"scale_out_{n}")
        print(f"  {n:>9,} rows, {summary['files_read']:>3} files: {summary['rows_per_second']:>8,.0f} rows/s, "
              f"wall {summary['wall_seconds']:.1f} s, peak RSS driver+Ray workers {mem.peak_total / 2**30:.2f} GiB "
              f"(driver {mem.peak_driver / 2**30:.2f} GiB); {load()}", flush=True)


PIPELINE_SCRIPT = """
import sys, pandas as pd
from transformers import pipeline
texts = pd.read_parquet(sys.argv[2]).sentence.tolist()
labels = [r["label"] for r in pipeline("text-classification", model=sys.argv[1], batch_size=32, device="cpu")(texts)]
pd.DataFrame({"sentence": texts, "label": labels}).to_parquet(sys.argv[3])
"""


def bench_whole(args, work: Path) -> None:
    """What a user feels: `python jobs/score.py` with no sizing flags (its own Ray start included) and
    `--precision` against a script that reads the same file, runs `pipeline(batch_size=32)` (fp32) and writes
    parquet, on validation sentences."""

    val = pd.read_parquet(SST2 / "validation.parquet").sentence.tolist()
    texts = (val * (args.whole_rows // len(val) + 1))[:args.whole_rows]
    model = args.model or minilm_classifier(work / "minilm")
    data = work / "whole.parquet"
    pd.DataFrame({"sentence": texts}).to_parquet(data)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    root = Path(__file__).resolve().parents[1]
    print(f"whole: {len(texts):,} SST-2 validation sentences (repeated), {os.cpu_count()} CPUs, job --precision "
          f"{args.precision}; {load()}", flush=True)
    for rep in range(args.repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", PIPELINE_SCRIPT, model, str(data), str(work / f"pipe_{rep}.parquet")],
                       env=env, check=True)
        pipe_s = time.perf_counter() - t0
        out = work / f"whole_out_{rep}"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "jobs/score.py", "--model", model, "--input", str(data), "--output", str(out),
                        "--precision", args.precision], cwd=root, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        job_s = time.perf_counter() - t0
        summary = json.loads((out / "_summary.json").read_text())
        agree = np.mean(read_scored(str(out)).label.to_numpy() == pd.read_parquet(work / f"pipe_{rep}.parquet").label)
        print(f"  run {rep + 1}: pipeline script {pipe_s:.1f} s | jobs/score.py {job_s:.1f} s "
              f"({summary['hardware']['model_actors']} actor(s) x {summary['hardware']['cpus_per_actor']} thread(s), "
              f"{summary['hardware']['dtype']}, "
              f"{summary['wall_seconds']:.1f} s inside the job) | ratio {pipe_s / job_s:.2f}x | labels agree "
              f"{agree:.2%} | {load()}", flush=True)


def bench_agree(args, work: Path) -> None:
    """A trained classifier (`--model`) scores SST-2 validation in fp32 and in int8 (raysst.quantize): how
    often int8's label is fp32's, and each one's accuracy against the gold labels."""
    if not args.model:
        raise SystemExit("agree: pass --model DIR, a trained classifier (a random head agrees by chance)")
    gold = pd.read_parquet(SST2 / "validation.parquet")
    data = work / "validation.parquet"
    gold[["sentence", "label", "idx"]].to_parquet(data)
    base = Config(model=args.model, input=str(data), output="unused", num_actors=args.num_workers,
                  cpus_per_worker=args.cpus_per_worker, eval_batch_size=args.batch_size)
    scored = {}
    for precision in ("fp32", "int8"):
        run_job(base.replace(precision=precision), work / f"agree_{precision}")
        scored[precision] = read_scored(str(work / f"agree_{precision}")).sort_values("idx")
    fp32, int8 = scored["fp32"], scored["int8"]
    labels = {k: (v.label == "positive").astype(int).to_numpy() for k, v in scored.items()}
    drift = np.abs(int8.prob_positive.to_numpy() - fp32.prob_positive.to_numpy()).max()
    acc = {k: float(np.mean(v == fp32.input_label.to_numpy())) for k, v in labels.items()}
    print(f"agree: {len(fp32)} SST-2 validation sentences, {args.model}: int8 labels agree with fp32 on "
          f"{np.mean(labels['int8'] == labels['fp32']):.2%} (target >= 99%); accuracy fp32 {acc['fp32']:.2%}, "
          f"int8 {acc['int8']:.2%} ({(acc['int8'] - acc['fp32']) * 100:+.2f} points; target within 0.3); "
          f"largest prob_positive difference {drift:.4f}",
          flush=True)


def bench_gpu(args, work: Path) -> None:
    import torch

    from raysst.models import make_random_model

    gpus = torch.cuda.device_count()
    if not gpus:
        raise SystemExit("gpu: no CUDA device on this machine")
    model = make_random_model(str(work / "bert_base"))  # bert-base-uncased's shape, random weights
    corpus = write_corpus(sst2_sentences(args.gpu_rows), work / "gpu_in", rows_per_file=args.rows_per_file)
    cfg = Config(model=model, input=corpus, output="unused", num_actors=gpus, use_gpu=True, precision="bf16",
                 eval_batch_size=args.gpu_batch_size, cpus_per_worker=1)
    for rep in range(args.repeats):
        summary = run_job(cfg, work / f"gpu_out_{rep}")
        devices = ", ".join(summary["hardware"]["rows_by_actor_device"])
        print(f"gpu: {summary['rows_scored_this_run']:,} rows on {devices}, bf16, batch "
              f"{cfg.eval_batch_size}: {summary['rows_per_second']:,.0f} rows/s (wall {summary['wall_seconds']:.1f} s "
              "incl. actor start and model load; target >= 20,000)", flush=True)


def bench_bigfile(args, work: Path) -> None:
    """One big parquet file (row groups of 100k), tiny BERT (hidden 64, 2 layers), `jobs/score.py` as a whole
    process: rows/s, peak RSS of its process tree, time by stage; then killed once half its chunks are
    committed and rerun: the rerun's wall time as a share of a full run's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysst.models import make_random_model
    from raysst.proctree import kill_job, start_job

    model = make_random_model(str(work / "tiny64"), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=128, max_position_embeddings=128)
    data = work / "big.parquet"
    pq.write_table(pa.table({"sentence": sst2_sentences(args.big_rows), "idx": np.arange(args.big_rows)}), data,
                   row_group_size=100_000)
    chunks = -(-args.big_rows // 100_000) * -(-100_000 // args.chunk_rows)

    def job(out: str, stop_at_parts: int = 0) -> tuple[float, ProcessTree]:
        proc, mark = start_job(["jobs/score.py", "--model", model, "--input", str(data), "--output", out,
                                "--batch-size", str(args.batch_size), "--chunk-rows", str(args.chunk_rows)],
                               stdout=subprocess.DEVNULL)
        t0 = time.perf_counter()
        try:
            with ProcessTree(pid=proc.pid) as tree:
                while proc.poll() is None:
                    if stop_at_parts and len(list(Path(out).glob("*/part-*.parquet"))) >= stop_at_parts:
                        break
                    time.sleep(0.1)
        finally:
            kill_job(proc, mark)
        return time.perf_counter() - t0, tree

    wall, tree = job(str(work / "big_out"))
    summary = json.loads((work / "big_out" / "_summary.json").read_text())
    print(f"bigfile: {args.big_rows:,} rows in one parquet file: {summary['rows_per_second']:,.0f} rows/s "
          f"(job's own wall {summary['wall_seconds']:.1f} s; process {wall:.1f} s incl. Ray start), peak RSS "
          f"{tree.peak_total / 2**30:.2f} GiB; actor-seconds by stage {summary['seconds_by_stage']}; {load()}",
          flush=True)
    job(str(work / "big_killed"), stop_at_parts=chunks // 2)
    rerun, _ = job(str(work / "big_killed"))
    again = json.loads((work / "big_killed" / "_summary.json").read_text())
    print(f"bigfile: killed at {chunks // 2}/{chunks} chunks, rerun scored {again['rows_scored_this_run']:,} rows in "
          f"{rerun:.1f} s = {rerun / wall:.0%} of a full run; rows out {again['rows_out']:,}; {load()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["speed", "scale"],
                        choices=["speed", "scale", "gpu", "whole", "agree", "bigfile"])
    parser.add_argument("--rows", type=int, default=20_000, help="speed: sentences scored")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=os.cpu_count(), help="model actors (default: one per core)")
    parser.add_argument("--cpus-per-worker", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rows-per-file", type=int, default=10_000)
    parser.add_argument("--scale-rows", type=int, default=20_000, help="scale: the small corpus; the large is 10x")
    parser.add_argument("--whole-rows", type=int, default=10_464, help="whole: rows (12 x the validation set)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="whole: the job's --precision")
    parser.add_argument("--model", help="whole, agree: a trained classifier (whole's default: MiniLM, random head)")
    parser.add_argument("--gpu-rows", type=int, default=500_000)
    parser.add_argument("--big-rows", type=int, default=1_000_000, help="bigfile: rows of the one file")
    parser.add_argument("--chunk-rows", type=int, default=100_000, help="bigfile: the job's --chunk-rows")
    parser.add_argument("--gpu-batch-size", type=int, default=512)
    parser.add_argument("--workdir", help="keep corpora and outputs here (default: a temporary directory)")
    args = parser.parse_args()

    os.environ.setdefault("RAY_ADDRESS", "local")  # a Ray of its own, even where other clusters run
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from raysst.runtime import init_ray

    if set(args.parts) - {"whole", "bigfile"}:  # `whole` times jobs that start their own Ray, as a user's would
        init_ray()  # started before any timing: a cluster is already up when a real job is submitted
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        for part in args.parts:
            {"speed": bench_speed, "scale": bench_scale, "gpu": bench_gpu, "whole": bench_whole,
             "agree": bench_agree, "bigfile": bench_bigfile}[part](args, work)


if __name__ == "__main__":
    main()
