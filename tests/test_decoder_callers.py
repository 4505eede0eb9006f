"""No module drives a decoder by hand: every caller goes through the decoder interface (issue 17).

The decoder interface (``edgevlm.runtime.decoders``: ``Decoder.prefill`` / ``step`` / ``kv_arrays``) is the one
place that feeds a decoder graph its KV cache. This static check scans every module of ``edgevlm/`` (AST, no
import) except the interface's implementations:

* ``edgevlm/runtime/decoders.py`` (ONNX Runtime + native decoders), ``edgevlm/runtime/kv_cache.py`` (the cache
  layouts they bind), ``edgevlm/runtime/trt_*.py`` (the TensorRT runners);

and fails on any of:

1. ``run_with_iobinding``: an IOBinding-driven graph run (the serving path's step);
2. a reference to ``HostKV``, ``make_kv_cache``, ``ConcatKVCache`` or ``SharedBufferKVCache``: a KV cache held
   outside a decoder;
3. a top-level function or class that both calls a ``.run(...)`` method (``InferenceSession.run`` and friends)
   and names the decoder's KV tensors (a string starting with ``past_key_values`` or ``present.``, or a call of
   ``past_names()`` / ``present_names()``): a decoder graph fed its pasts by hand.

Rule 3 is what a hand-written ``InferenceSession(decoder.onnx).run(...)`` loop cannot avoid (a KV-cached decoder
needs its pasts fed); building feeds without running them (calibration samples for ORT's calibrators) or running
a graph that is not a decoder (vision, bench's probe graphs) is allowed. The rules are checked against snippets
of the hand-driven loops that existed before the interface (so they are not vacuous).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "edgevlm"
ALLOWED = ("runtime/decoders.py", "runtime/kv_cache.py", "runtime/trt_*.py")
KV_DRIVERS = ("HostKV", "make_kv_cache", "ConcatKVCache", "SharedBufferKVCache")
KV_NAME_CALLS = ("past_names", "present_names")


def _allowed(path: Path) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel.match(pattern) for pattern in ALLOWED)


def _names_kv(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and \
                n.value.startswith(("past_key_values", "present.")):
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in KV_NAME_CALLS:
            return True
    return False


def _calls_run(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "run"
               for n in ast.walk(node))


def violations(source: str, where: str = "<source>") -> list[str]:
    """Every breach of rules 1-3 in one module's source (``where: rule: detail``)."""
    tree = ast.parse(source)
    out = []
    for n in ast.walk(tree):
        name = (n.attr if isinstance(n, ast.Attribute) else n.id if isinstance(n, ast.Name)
                else None)
        if name == "run_with_iobinding":
            out.append(f"{where}:{n.lineno}: rule 1: run_with_iobinding (an IOBinding decoder step)")
        if name in KV_DRIVERS:
            out.append(f"{where}:{n.lineno}: rule 2: {name} (a KV cache held outside a decoder)")
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            for alias in n.names:
                if alias.name.split(".")[-1] in KV_DRIVERS:
                    out.append(f"{where}:{n.lineno}: rule 2: imports {alias.name}")
    for top in tree.body:
        if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _calls_run(top) \
                and _names_kv(top):
            out.append(f"{where}:{top.lineno}: rule 3: '{top.name}' runs a graph and feeds it KV tensors by hand")
    return out


def test_no_module_drives_a_decoder_outside_the_interface():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if not _allowed(path):
            found += violations(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT.parent)))
    assert not found, ("modules drive a decoder by hand; use edgevlm.runtime.decoders (OrtDecoder / open_decoder, "
                       "Decoder.prefill / step / kv_arrays):\n" + "\n".join(found))


def test_the_allowed_modules_are_the_interface():
    assert _allowed(ROOT / "runtime" / "decoders.py") and _allowed(ROOT / "runtime" / "trt_engine.py")
    assert not _allowed(ROOT / "exporter" / "verify.py") and not _allowed(ROOT / "runtime" / "session.py")


# Shapes of the hand-driven loops that existed before the interface (quant/report.DecoderRunner, exporter/verify,
# exporter/parity, calibration's reader, Session's IOBinding loop): each must be caught.
_BEFORE = {
    "report": """
        class DecoderRunner:
            def __init__(self, path):
                from edgevlm.runtime.kv_cache import HostKV, KVSpec
                self.sess = ort_session(path)
                self.kv = HostKV(KVSpec.from_graph_inputs({}))
            def _run(self, embeds):
                return self.sess.run(self.out_names, self.kv.feeds(embeds))
    """,
    "parity": """
        def check_decoder(path, refs):
            sess = ort_session(path)
            present = spec.present_names()
            outs = sess.run(None, feeds)
    """,
    "verify": """
        class _Verifier:
            def _run_decoder(self):
                feeds = {"inputs_embeds": x, **{n: p for n, p in zip(kv.past_names(), pasts)}}
                return self.sessions["decoder"].run(None, feeds)
    """,
    "literal": """
        def step(sess, x, past):
            return sess.run(None, {"inputs_embeds": x, "past_key_values.0.key": past})
    """,
    "session": """
        class Session:
            def _run_decoder(self):
                self.decoder_session.run_with_iobinding(self._binding)
    """,
}


@pytest.mark.parametrize("name", sorted(_BEFORE))
def test_the_rules_catch_the_hand_driven_loops(name):
    assert violations(textwrap.dedent(_BEFORE[name]), name)


def test_the_rules_allow_feeds_without_runs_and_non_decoder_runs():
    ok = textwrap.dedent("""
        def calibration_feed(decoder, embeds, spec):
            decoder.prefill(embeds)
            return {"inputs_embeds": embeds, **dict(zip(spec.past_names(), decoder.kv_arrays()))}

        def vision(sess, px):
            return sess.run(None, {"pixel_values": px})[0]
    """)
    assert violations(ok) == []
