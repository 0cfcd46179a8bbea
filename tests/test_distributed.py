"""Data-parallel runs (`dln_ens.distributed`): the sharding rule, the sharded backend against
the unsharded call (simulated processes in threads), device placeholders, and `dln-ens run`
under torchrun with two CPU processes (gloo) against the one-process run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dln_ens.distributed.processes import Processes
from dln_ens.distributed.devices import DeviceSpecError, narrow_visible_gpus, process_gpus, with_local_rank
from dln_ens.distributed.shard import shard_owners
from dln_ens.distributed.sharded_lm import ShardedLanguageModel, ShardedPool
from dln_ens.lm.base import Generation, Score

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_shard_owners_keep_keys_together_in_order_and_balance(world):
    rng = np.random.default_rng(world)
    keys = [f"k{int(k)}" for k in rng.integers(0, 12, size=60)]
    owners = shard_owners(keys, world)
    by_key: dict[str, set] = {}
    for k, r in zip(keys, owners):
        by_key.setdefault(k, set()).add(r)
    assert all(len(rs) == 1 for rs in by_key.values())
    first_seen = list(dict.fromkeys(keys))
    ranks = [by_key[k].pop() for k in first_seen]
    assert ranks == sorted(ranks)                      # contiguous runs of keys
    loads = [owners.count(r) for r in range(world)]
    biggest = max(keys.count(k) for k in first_seen)
    assert max(loads) - min(loads) <= 2 * biggest      # balanced up to the size of a key's group
    assert shard_owners(keys, world) == owners         # deterministic


def test_shard_owners_distinct_keys_split_evenly():
    assert shard_owners(list("abcdef"), 2) == [0, 0, 0, 1, 1, 1]
    assert shard_owners(list("abcdefg"), 3) == [0, 0, 1, 1, 1, 2, 2]   # 2, 3, 2
    assert shard_owners([], 4) == []


# ----------------------------------------------------------------------------- simulated processes

class ThreadProcesses:
    """The `Processes` collectives between threads of one test (one object per rank)."""

    def __init__(self, rank, world, board):
        self.rank, self.world_size, self.local_rank = rank, world, rank
        self.board = board

    is_main = property(lambda self: self.rank == 0)
    distributed = property(lambda self: self.world_size > 1)

    def gather(self, obj):
        slots, barrier = self.board
        barrier.wait()
        slots[self.rank] = obj
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    def broadcast(self, obj):
        return self.gather(obj)[0]

    gather_or_raise = Processes.gather_or_raise

    def barrier(self):
        self.gather(None)


def run_ranks(world, body):
    """``body(procs)`` on ``world`` threads; their results (or exceptions) per rank."""
    board = ([None] * world, threading.Barrier(world, timeout=20))
    out = [None] * world

    def go(r):
        try:
            out[r] = ("ok", body(ThreadProcesses(r, world, board)))
        except Exception as e:
            out[r] = ("error", e)
    threads = [threading.Thread(target=go, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return out


class KeyedLM:
    """Answers depend only on the request, the seed and how often its prompt came before in the
    call (what `sequence_seeds` keys on); records what each instance computed."""

    name = "keyed"

    def __init__(self, fail_on=None):
        self.seen: list[str] = []
        self.fail_on = fail_on

    def generate(self, prompts, *, max_new_tokens, stop=(), temperature=0.0, seed=None):
        if self.fail_on in prompts:
            raise ValueError(f"cannot continue {self.fail_on!r}")
        self.seen += prompts
        count: dict[str, int] = {}
        out = []
        for p in prompts:
            count[p] = count.get(p, -1) + 1
            out.append(Generation(text=f"{p}|{seed}|{count[p]}", logprob=-len(p), num_tokens=count[p]))
        return out

    def score(self, contexts, targets):
        self.seen += contexts
        return [Score(logprob=-float(len(c) * 7 + len(t)), num_tokens=len(t)) for c, t in zip(contexts, targets)]

    def next_token_logprobs(self, contexts, candidates, *, aggregate="max"):
        self.seen += contexts
        return np.array([[-float(len(c) + j) for j in range(len(candidates))] for c in contexts])


PROMPTS = ["b", "a", "c", "a", "d", "e", "a", "f", "g"]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_calls_equal_the_whole_call_and_split_the_work(world):
    ref = KeyedLM()
    want_gen = ref.generate(PROMPTS, max_new_tokens=4, temperature=0.7, seed=11)
    want_score = ref.score(PROMPTS, [p * 2 for p in PROMPTS])
    want_next = ref.next_token_logprobs(PROMPTS, ["x", "y"])
    inners = [KeyedLM() for _ in range(world)]

    def body(procs):
        lm = ShardedLanguageModel(inners[procs.rank], procs)
        return (lm.generate(PROMPTS, max_new_tokens=4, temperature=0.7, seed=11),
                lm.score(PROMPTS, [p * 2 for p in PROMPTS]),
                lm.next_token_logprobs(PROMPTS, ["x", "y"]), lm.requests)

    results = run_ranks(world, body)
    for status, (gen, score, nxt, requests) in results:
        assert status == "ok"
        assert gen == want_gen and score == want_score
        np.testing.assert_array_equal(nxt, want_next)
    # every request computed exactly once, by one process
    assert sorted(p for lm in inners for p in lm.seen) == sorted(PROMPTS * 3)
    assert sum(r[1][3]["generate"] for r in results) == len(PROMPTS)
    assert all(lm.seen for lm in inners)


def test_an_error_in_one_share_is_raised_on_every_process():
    def body(procs):
        return ShardedLanguageModel(KeyedLM(fail_on="g"), procs).generate(PROMPTS, max_new_tokens=2)

    results = run_ranks(2, body)
    assert [s for s, _ in results] == ["error", "error"]
    assert all(isinstance(e, ValueError) and "'g'" in str(e) for _, e in results)


def test_unseeded_sampling_uses_rank_0s_seed():
    import torch

    def body(procs):
        torch.manual_seed(procs.rank)   # processes whose generators differ still agree
        return ShardedLanguageModel(KeyedLM(), procs).generate(["a", "b"], max_new_tokens=2, temperature=1.0)
    (s0, g0), (s1, g1) = run_ranks(2, body)
    assert s0 == s1 == "ok" and g0 == g1
    assert g0[0].text.split("|")[1] != "None"


def test_pool_shares_report_each_process():
    inners = [KeyedLM(), KeyedLM()]

    class Pool:
        cfg = None

        def __init__(self, lm):
            self.lm = lm

        def get(self, name):
            return self.lm

    def body(procs):
        pool = ShardedPool(Pool(inners[procs.rank]), procs)
        pool.get("x").score(PROMPTS, PROMPTS)
        return pool.shares()
    (_, a), (_, b) = run_ranks(2, body)
    assert a == b and a["num_processes"] == 2
    assert [p["requests"]["score"] for p in a["processes"]] == [len(inners[0].seen), len(inners[1].seen)]
    assert sum(p["share"] for p in a["processes"]) == pytest.approx(1.0)


def test_other_ranks_work_in_a_scratch_copy_of_the_run_directory(tmp_path):
    from dln_ens.distributed.run_dir import process_run_dir
    run = tmp_path / "runs" / "r"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "cell.json").write_text("{}")
    (run / "dln_a.jsonl").write_bytes(b'{"iteration": 0}\n')
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def body(procs):
        with process_run_dir(run, procs) as d:
            seen = {p.relative_to(d): p.read_bytes() for p in d.rglob("*") if p.is_file()}
            (d / "dln_a.jsonl").write_text(f"rank {procs.rank}\n")
            where = d
        return where, seen, where.exists()
    (_, (d0, seen0, _)), (_, (d1, seen1, kept1)) = run_ranks(2, body)
    assert d0 == run and d1 != run and not kept1          # rank 1's scratch copy is gone
    assert seen0 == seen1 == {p.relative_to(run): b for p, b in before.items()}
    assert (run / "dln_a.jsonl").read_text() == "rank 0\n"


# ----------------------------------------------------------------------------- devices

def test_local_rank_placeholders():
    assert with_local_rank("cuda:{local_rank}", 3) == "cuda:3"
    assert with_local_rank({"model.embed": "cuda:{local_rank}", "lm_head": 0}, 1) == {"model.embed": "cuda:1",
                                                                                       "lm_head": 0}
    assert with_local_rank(None, 2) is None and with_local_rank("auto", 2) == "auto"
    with pytest.raises(DeviceSpecError, match=r"\{rank\}"):
        with_local_rank("cuda:{rank}", 0)


def test_gpus_per_process_arithmetic(monkeypatch):
    assert process_gpus(list("01234567"), 1, 2) == ["2", "3"]
    assert process_gpus(list("01234567"), 3, 2) == ["6", "7"]
    with pytest.raises(DeviceSpecError, match="at most 2 processes"):
        process_gpus(list("0123"), 2, 2)
    monkeypatch.setenv("DLN_ENS_GPUS_PER_PROCESS", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    narrow_visible_gpus(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"


def test_unknown_device_placeholder_is_a_config_error(tmp_path, tiny_gpt2_dir):
    from dln_ens.config import ConfigError, load_config
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"name": "x", "backends": {"m": {"type": "hf", "path": str(tiny_gpt2_dir),
                                                                "device": "cuda:{rank}"}}}))
    with pytest.raises(ConfigError, match=r"backends\.m\.device.*\{local_rank\}"):
        load_config(conf)


# ----------------------------------------------------------------------------- two real processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_conf(path: Path, runs: Path, gpt2: Path, llama: Path, iters: int = 2, matrices: Path | None = None) -> Path:
    """Eval of two tiny models; a DLN-2 with the hidden layer and posterior on one, proposals
    on the other; with ``matrices``, also a DLN-1 on their DeePEn ensemble."""
    conf = {"name": "dp", "runs_dir": str(runs),
            "backends": {"gpt2": {"type": "hf", "path": str(gpt2), "batch_size": 4},
                         "llama": {"type": "hf", "path": str(llama), "batch_size": 4}},
            "eval": {"tasks": ["navigate", "facts_qa"], "backends": ["gpt2", "llama"], "split": "test",
                     "num_examples": 6, "max_new_tokens": 4},
            "dln": {"task": "navigate", "systems": [{"name": "two", "layers": 2, "backend": "llama",
                                                     "proposer": "gpt2"}],
                    "iters": iters, "batch_size": 3, "num_p_samples": 2, "num_h_samples": 2, "num_dev": 4,
                    "num_test": 4, "hidden_max_new_tokens": 6, "output_max_new_tokens": 4,
                    "proposal_max_new_tokens": 6, "proposal_max_examples": 1}}
    if matrices is not None:
        conf["backends"]["ens"] = {"type": "ensemble", "members": ["gpt2", "llama"], "main": "gpt2",
                                   "matrices": str(matrices), "topk": 16, "min_anchors": 10}
        conf["eval"]["backends"].append("ens")
        conf["dln"]["systems"].append({"name": "one-ens", "layers": 1, "backend": "ens"})
    path.write_text(json.dumps(conf))
    return path


def launch(conf: Path, tmp: Path, nproc: int = 2) -> subprocess.Popen:
    """`dln-ens run` under torchrun; rank>0 scratch copies go under ``tmp/scratch``."""
    (tmp / "scratch").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp / "scratch"), "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "dln_ens", "run", "--conf", str(conf)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)   # torchrun stops its workers
        out, _ = proc.communicate(timeout=120)
        pytest.fail(f"2-process run timed out:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def one_process(conf: Path) -> None:
    from dln_ens.cli import main
    assert main(["run", "--conf", str(conf)]) == 0


def outcome(run_dir: Path) -> dict:
    """What must not depend on the number of processes: accuracies, predictions, prompts,
    generated texts; ELBOs separately (floating point, see `elbos`)."""
    out = {"eval": [{k: v for k, v in r.items() if k != "seconds"}
                    for r in map(json.loads, (run_dir / "eval_results.jsonl").read_text().splitlines())]}
    for p in sorted((run_dir / "eval").glob("*.predictions.jsonl")):
        out[p.name] = p.read_text()
    res = json.loads((run_dir / "results.json").read_text())
    out["systems"] = res["systems"]
    for p in sorted(run_dir.glob("dln_*.jsonl")):
        rows = [json.loads(x) for x in p.read_text().splitlines()]
        out[p.name] = [{k: r.get(k) for k in ("iteration", "prompts", "dev_acc", "batch", "updated")} for r in rows]
        out[p.name + " samples"] = [json.dumps(r.get("posterior", {}).get("samples")) for r in rows]
        out[p.name + " candidates"] = [[c["prompt"] for c in r.get("p1_candidates", []) + r.get("p2_candidates", [])]
                                       for r in rows]
    return out


def elbos(run_dir: Path) -> list[float]:
    return [c["elbo"] for p in sorted(run_dir.glob("dln_*.jsonl")) for r in map(json.loads, p.read_text().splitlines())
            for c in r.get("p1_candidates", []) + r.get("p2_candidates", [])]


def assert_same_run(multi: Path, single: Path) -> None:
    assert outcome(multi) == outcome(single)
    # float32 batches of different composition: equal up to rounding (README, "Scaling out")
    np.testing.assert_allclose(elbos(multi), elbos(single), rtol=1e-4, atol=1e-5)
    assert sorted(p.relative_to(multi).as_posix() for p in multi.rglob("*")) == \
        sorted(p.relative_to(single).as_posix() for p in single.rglob("*"))


def test_two_processes_equal_one(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    proc = launch(write_conf(tmp_path / "two.json", tmp_path / "runs2", tiny_gpt2_dir, tiny_llama_dir), tmp_path)
    one_process(write_conf(tmp_path / "one.json", tmp_path / "runs1", tiny_gpt2_dir, tiny_llama_dir))
    out = finish(proc)
    multi, single = tmp_path / "runs2" / "dp", tmp_path / "runs1" / "dp"
    assert_same_run(multi, single)
    res = json.loads((multi / "results.json").read_text())
    assert res["num_processes"] == 2 and [p["rank"] for p in res["processes"]] == [0, 1]
    assert all(p["total"] > 0 for p in res["processes"])
    assert json.loads((single / "results.json").read_text())["num_processes"] == 1
    # only rank 0 wrote: nothing else under runs2, each log line once, rank 1's scratch removed
    assert [p.name for p in (tmp_path / "runs2").iterdir()] == ["dp"]
    iters = [json.loads(x)["iteration"] for x in (multi / "dln_two.jsonl").read_text().splitlines()]
    assert iters == [0, 1, 2]
    assert not list((tmp_path / "scratch").glob("dln-ens-*"))
    assert out.count("## Backends on held-out tasks") == 1 and out.count("# DLN results") == 1


@pytest.mark.slow
def test_interrupted_two_process_run_resumes_to_the_same_result(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    from dln_ens.lm.hf import HFLanguageModel
    from dln_ens.relrep.build import build_matrices
    mats = tmp_path / "mats"
    build_matrices({"gpt2": HFLanguageModel.from_pretrained(tiny_gpt2_dir),
                    "llama": HFLanguageModel.from_pretrained(tiny_llama_dir)}, mats, topk=16, min_anchors=10,
                   progress=False)
    conf2 = write_conf(tmp_path / "two.json", tmp_path / "runs2", tiny_gpt2_dir, tiny_llama_dir, iters=4,
                       matrices=mats)
    state = tmp_path / "runs2" / "dp" / "dln_two.state.json"
    proc = launch(conf2, tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["iteration"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)   # torchrun stops its workers (as on Ctrl-C)
    proc.communicate(timeout=120)      # the pipe closes when every worker has exited
    assert not json.loads(state.read_text())["done"]
    finish(launch(conf2, tmp_path))
    one_process(write_conf(tmp_path / "one.json", tmp_path / "runs1", tiny_gpt2_dir, tiny_llama_dir, iters=4,
                           matrices=mats))
    assert_same_run(tmp_path / "runs2" / "dp", tmp_path / "runs1" / "dp")


def test_bench_parallel_reads_the_non_parallel_fraction(tmp_path, capsys):
    from dln_ens.bench.parallel import main
    run = tmp_path / "r"
    run.mkdir()
    calls = {"gen": {"generate": {"calls": 1, "requests": 4, "seconds": 3.0},
                     "score": {"calls": 2, "requests": 8, "seconds": 4.5}}}
    rows = [{"system": "s", "iteration": 0, "dev_acc": 0.5},
            {"system": "s", "iteration": 1, "seconds": 10.0, "lm_calls": calls},
            {"system": "s", "iteration": 2, "seconds": 10.0, "lm_calls": calls}]
    (run / "dln_s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    # 2.5 of every 10 s is outside the backends: f = 0.25, Amdahl bound on 2 = 1 / (0.25 + 0.375) = 1.6
    assert "| s | 2 | 10 | 7.5 | 0.25 | 1.6 |" in out


@pytest.mark.slow
def test_two_processes_build_the_same_matrices(tmp_path, tiny_gpt2_dir, tiny_llama_dir):
    from safetensors.torch import load_file
    from dln_ens.cli import main

    def conf(name):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"name": name, "backends": {
            "gpt2": {"type": "hf", "path": str(tiny_gpt2_dir)}, "llama": {"type": "hf", "path": str(tiny_llama_dir)},
            "ens": {"type": "ensemble", "members": ["gpt2", "llama"], "main": "gpt2",
                    "matrices": str(tmp_path / name), "topk": 16, "min_anchors": 10}}}))
        return path
    (tmp_path / "scratch").mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "dln_ens", "mat", "--conf", str(conf("two")), "--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert main(["mat", "--conf", str(conf("one"))]) == 0
    out = finish(proc)
    one, two = tmp_path / "one", tmp_path / "two"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    for m in ("gpt2", "llama"):
        a, b = load_file(one / f"{m}.safetensors"), load_file(two / f"{m}.safetensors")
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    meta1, meta2 = (json.loads((d / "meta.json").read_text()) for d in (one, two))
    assert meta1["fingerprints"] == meta2["fingerprints"] and meta1["num_anchors"] == meta2["num_anchors"]
    assert (one / "anchors.json").read_text() == (two / "anchors.json").read_text()
    assert out.count("ens/gpt2: vocabulary") == 1 and out.count("ens/llama: vocabulary") == 1


def test_token_counts_see_through_the_sharded_wrapper(tiny_gpt2_dir):
    """The DLN's token costs are read from the model's tokenizer, also behind the wrapper every
    `dln-ens run` puts around its backends."""
    from dln_ens.dln.calls import CountingLM
    from dln_ens.lm.hf import HFLanguageModel
    lm = HFLanguageModel.from_pretrained(tiny_gpt2_dir)
    counted = CountingLM(ShardedLanguageModel(lm, Processes()))
    counted.score(["Input: yes"], [" no"])
    want = len(lm.encode("Input: yes")) + len(lm.encode(" no"))
    assert counted.tokens is not None and counted.tokens["prompt"] == want
