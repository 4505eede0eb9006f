"""benchmarks/peer_compare.py without llama.cpp: its output parsers on captured output (trimmed from a
run's llama-mtmd-cli and llama-bench, llama.cpp 0c1e570, on the 2-core AMD EPYC), the median / ratio table, the
tokenizer.json -> SentencePiece conversion, path scrubbing, the process timer. The test that needs a llama.cpp build
runs only where ``EDGEVLM_LLAMA_BUILD`` names one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pc():
    spec = importlib.util.spec_from_file_location("peer_compare", ROOT / "benchmarks" / "peer_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# llama-mtmd-cli -lv 4 (stdout + stderr), repetition 0 of a run of the script (192 positions, 64 new tokens),
# from the threadpool line on; the CLIP loader's lines are cut, the model path is a placeholder
MTMD_LOG = """\
0.00.682.029 I cmn          init: llama threadpool init, n_threads = 2
0.00.682.038 I cmn  common_init_: warming up the model with an empty run - please wait ... (--no-warmup to disable)
0.01.074.530 I get_dummy_batch: warmup with image size = 336 x 336
0.01.075.896 I get_dummy_batch: warmup with image size = 336 x 336
0.01.076.941 I warmup: flash attention is enabled
0.01.077.000 I mtmd_cli_context: chat template example:
You are a helpful assistant### Instruction:
Hello
### Response:

0.01.077.291 I main: loading model: GGUF_DIR/llm-q4_0.gguf
0.01.077.548 W WARN: This is an experimental CLI for testing multimodal capability.
0.01.077.564 W       For normal use cases, please use the standard llama-cli
0.01.255.602 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
0.04.067.987 I mtmd batch encoding done in 2813 ms
0.04.068.023 I decoding image batch 1/1, n_tokens_batch = 144
0.05.519.611 I image decoded (batch 1/1) in 1451 ms



0.07.895.950 I llama_perf_context_print:        load time =     685.49 ms
0.07.895.982 I llama_perf_context_print: prompt eval time =    4785.44 ms /   192 tokens (   24.92 ms per token,    40.12 tokens per second)
0.07.896.031 I llama_perf_context_print:        eval time =    1988.03 ms /    63 runs   (   31.56 ms per token,    31.69 tokens per second)
0.07.896.062 I llama_perf_context_print:       total time =    7152.49 ms /   255 tokens
0.07.896.091 I llama_perf_context_print:    graphs reused =         63
"""

# llama-bench -o json -r 1 -t 2, the same repetition: `-p 0 -n 64 -d 0,192` then `-p 192 -n 0` (fields the script does
# not use cut), with a log line in front
BENCH_JSON = """\
load_backend: loaded CPU backend
[
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "backends": "CPU",
   "model_type": "llama ?B Q4_0", "model_size": 784658432, "model_n_params": 1364297728, "n_threads": 2,
   "type_k": "f16", "type_v": "f16", "flash_attn": -1, "repack": true, "n_prompt": 0, "n_gen": 64, "n_depth": 0,
   "avg_ns": 1742715131, "stddev_ns": 0, "avg_ts": 36.724304, "stddev_ts": 0.000000,
   "samples_ns": [ 1742715131 ], "samples_ts": [ 36.7243 ]},
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "backends": "CPU",
   "model_type": "llama ?B Q4_0", "model_size": 784658432, "model_n_params": 1364297728, "n_threads": 2,
   "type_k": "f16", "type_v": "f16", "flash_attn": -1, "repack": true, "n_prompt": 0, "n_gen": 64, "n_depth": 192,
   "avg_ns": 1964826993, "stddev_ns": 0, "avg_ts": 32.572842, "stddev_ts": 0.000000,
   "samples_ns": [ 1964826993 ], "samples_ts": [ 32.5728 ]},
  {"build_commit": "0c1e570", "build_number": 1, "n_prompt": 192, "n_gen": 0, "n_depth": 0,
   "avg_ns": 1916038318, "avg_ts": 100.206764, "samples_ns": [ 1916038318 ], "samples_ts": [ 100.207 ]}
]
"""


def test_parse_mtmd_log(pc):
    r = pc.parse_mtmd_log(MTMD_LOG)
    assert r["image_encode_ms"] == 2813 and r["image_encodes"] == 1
    assert r["image_decode_ms"] == 1451
    assert r["load_ms"] == pytest.approx(685.49)
    assert (r["prompt_tokens"], r["eval_runs"], r["total_tokens"]) == (192, 63, 255)
    # llama_perf's prompt-eval window spans the CLIP encode: it is subtracted
    assert r["prefill_excludes_encode"] and r["prefill_ms"] == pytest.approx(4785.44 - 2813)
    assert r["prefill_tok_s"] == pytest.approx(192 / ((4785.44 - 2813) / 1e3))
    assert r["decode_tok_s"] == pytest.approx(63 / 1.98803)


def test_parse_mtmd_log_older_helper_line_and_missing_parts(pc):
    older = MTMD_LOG.replace("mtmd batch encoding done in 2813 ms", "image slice encoded in 2664 ms")
    assert pc.parse_mtmd_log(older)["image_encode_ms"] == 2664
    cut = MTMD_LOG.split("llama_perf_context_print")[0]                 # killed before the perf summary
    with pytest.raises(ValueError, match="prompt_eval_ms"):
        pc.parse_mtmd_log(cut)


def test_mtmd_ready_and_done_lines(pc):
    lines = MTMD_LOG.splitlines()
    first_ready = next(i for i, ln in enumerate(lines) if pc.MTMD_READY.search(ln))
    assert "main: loading model:" in lines[first_ready]                 # after load + warm-up, before the request
    assert not any(pc.MTMD_READY.search(ln) for ln in lines[:first_ready])
    first_done = next(i for i, ln in enumerate(lines) if pc.MTMD_DONE.search(ln))
    assert "load time" in lines[first_done] and first_done > first_ready


def test_parse_llama_bench_json(pc):
    rows = pc.parse_llama_bench_json(BENCH_JSON)
    assert [r["test"] for r in rows] == ["tg64", "tg64@d192", "pp192"]
    assert pc.bench_rate(rows, "tg64@d192") == pytest.approx(32.572842)
    assert pc.bench_rate(rows, "pp192") == pytest.approx(100.206764)
    assert pc.bench_rate(rows, "tg64@d64") is None
    assert rows[0]["build_commit"] == "0c1e570" and rows[0]["repack"] is True
    with pytest.raises(ValueError):
        pc.parse_llama_bench_json("error: failed to load model")


def test_summary_table_medians_and_ratio_direction(pc):
    def run(ll, ed):
        keys = ("load_s", "vision_ms", "prefill_tok_s", "decode_tok_s", "e2e_s")
        return {"llama.cpp": dict(zip(keys, ll)), "edgevlm": dict(zip(keys, ed))}

    runs = [run((0.9, 2600, 64, 29, 8.8), (1.7, 2000, 74, 25, 7.1)),
            run((0.8, 2700, 63, 30, 8.7), (1.6, 1900, 73, 26, 7.2)),
            run((1.0, 2650, None, 28, 9.0), (1.8, 1950, 75, 24, 7.0))]   # a failed llama-bench: None is skipped
    rows = {r["stage"]: r for r in pc.summary_table(runs)}
    assert rows["vision_ms"]["llama.cpp"] == 2650 and rows["vision_ms"]["edgevlm"] == 1950
    assert rows["vision_ms"]["ratio"] == pytest.approx(1950 / 2650) and rows["vision_ms"]["faster"] == "edgevlm"
    assert rows["prefill_tok_s"]["llama.cpp"] == pytest.approx(63.5)    # median of the two that ran
    assert rows["prefill_tok_s"]["faster"] == "edgevlm"                  # rate: higher wins
    assert rows["decode_tok_s"]["faster"] == "llama.cpp" and rows["decode_tok_s"]["ratio_text"] == "0.86x"
    assert rows["load_s"]["faster"] == "llama.cpp"                       # time: lower wins
    assert rows["load_s"]["ratio_text"] == "1.89x time (1.9x slower)"
    md = pc.markdown_table(list(rows.values()), {"llama.cpp": {"bound_tok_s": 40.0, "fraction": 0.7},
                                                 "edgevlm": {"bound_tok_s": 42.0, "fraction": 0.6}})
    assert "| vision (CLIP-L/336 + LDP) | 2650 ms | 1950 ms | 0.74x time | edgevlm |" in md
    assert "40.0 tok/s (70 % reached)" in md
    empty = pc.ratio_row("decode_tok_s", "decode", "tok/s", "rate", None, 25.0)
    assert empty["ratio"] is None and empty["faster"] is None


def test_sentencepiece_from_tokenizer_json_matches_hf(pc, tmp_path):
    pytest.importorskip("sentencepiece")
    import sentencepiece as spm
    from tokenizers import Tokenizer

    from edgevlm.train.tokenizer import train_tokenizer

    text = ["what colour is the small red circle near the left edge of the picture",
            "describe the picture in detail and count the shapes", "a blue square sits in the top right corner"]
    tok = train_tokenizer(text * 20, vocab_size=120)            # a Metaspace BPE like the stand-in's
    tj = json.loads(tok.to_str())
    path = tmp_path / "tokenizer.model"
    path.write_bytes(pc.sentencepiece_from_tokenizer_json(tj))
    sp = spm.SentencePieceProcessor(model_file=str(path))
    hf = Tokenizer.from_str(tok.to_str())
    assert sp.get_piece_size() == hf.get_vocab_size()
    for s in ["what is in the picture?", "count the red circles\nand squares", "describe it in detail"]:
        assert sp.encode(s) == hf.encode(s, add_special_tokens=False).ids, s


def test_scrub_replaces_whole_paths_only(pc):
    subs = [("/tmp", "TMP"), ("/data/ckpt", "CKPT"), ("/data/ckpt-int4", "BUNDLE")]
    out = pc.scrub({"a": "/data/ckpt/config.json", "b": ["--bundle /data/ckpt-int4 --x=/tmp/y"],
                    "c": "/srv/tmp/keep", "/data/ckpt": 1}, subs)
    assert out == {"a": "CKPT/config.json", "b": ["--bundle BUNDLE --x=TMP/y"], "c": "/srv/tmp/keep", "CKPT": 1}


def test_run_timed_marks_ready_and_done(pc):
    code = ("import sys, time; print('loading', flush=True); time.sleep(0.2); print('READY', file=sys.stderr, "
            "flush=True); time.sleep(0.3); print('DONE', file=sys.stderr, flush=True); time.sleep(0.2)")
    r = pc.run_timed([sys.executable, "-c", code], lambda s: s == "READY", 30, done=lambda s: s == "DONE")
    assert r["returncode"] == 0 and "loading" in r["output"]
    # ordering, not durations: READY follows a 0.2 s sleep after spawn, DONE comes after READY, the exit last
    assert 0.2 <= r["ready_s"] and 0 < r["request_s"] and r["ready_s"] + r["request_s"] <= r["wall_s"]
    assert r["request_end"] == "done line" and r["peak_rss_mib"] > 1


def test_missing_binaries_name_the_build_command(pc, tmp_path):
    (tmp_path / "bin").mkdir()
    with pytest.raises(SystemExit, match="cmake --build .* --target llama-bench llama-mtmd-cli llama-quantize"):
        pc.find_binaries(tmp_path)


def test_cpu_slug(pc):
    env = {"cpu": {"model": "AMD EPYC 7B13 64-Core Processor", "isa": ["avx2"], "cores_usable": 2}}
    assert pc.cpu_slug(env) == "amd-epyc-7b13-2c-avx2"
    env = {"cpu": {"model": "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "isa": ["avx2", "avx512f"],
                   "cores_usable": 2}}
    assert pc.cpu_slug(env) == "intel-xeon-platinum-8481c-2c-avx512"


@pytest.mark.skipif(not os.environ.get("EDGEVLM_LLAMA_BUILD"),
                    reason="needs a llama.cpp build: set EDGEVLM_LLAMA_BUILD to its CMake build directory")
def test_llama_build_info(pc):
    build = Path(os.environ["EDGEVLM_LLAMA_BUILD"])
    bins = pc.find_binaries(build)
    info = pc.build_info(bins, build)
    assert info.get("build_commit") and info.get("version")
    src = pc.find_source(build, None)
    assert (src / pc.LLM_CONVERTER).is_file()
