"""The decoder interface (``edgevlm.runtime.decoders``): every backend gives the logits of a plain, cache-free run.

On the concat (Optimum) and the shared-buffer (GroupQueryAttention) graph of a tiny bundle, ``OrtDecoder``'s
prefill + steps equal one prefill over the whole sequence; ``kv_arrays`` has the cache's shape; a full cache and a
too-long prompt raise ``PromptError``; the protocols are satisfied; ``open_decoder`` picks backends as documented.
"""

from __future__ import annotations

import numpy as np
import pytest

from fixtures_bundles import tiny_bundle

pytest.importorskip("onnxruntime")

from edgevlm.bundle import load_embedding_table, read_bundle  # noqa: E402
from edgevlm.errors import ConfigError, PromptError  # noqa: E402
from edgevlm.runtime.backends import BackendOptions  # noqa: E402
from edgevlm.runtime.decoders import Decoder, OrtDecoder, open_decoder  # noqa: E402

GRAPHS = ("portable", "gqa")


def _graph_or_skip(graph: str) -> None:
    if graph == "gqa":
        pytest.importorskip("onnxruntime_genai")


def _bundle(tmp_path_factory, graph: str):
    _graph_or_skip(graph)
    path, _ = tiny_bundle(tmp_path_factory, "tiny-ldpnetv2", decoder_graph=graph)
    return read_bundle(path, verify_hashes=False)


@pytest.mark.parametrize("graph", GRAPHS)
def test_ort_decoder_steps_equal_one_prefill(tmp_path_factory, graph):
    b = _bundle(tmp_path_factory, graph)
    table = load_embedding_table(b)
    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((1, 9, table.shape[1])).astype(np.float32) * 0.1   # [1, T, D]
    toks = [5, 17, 42]
    with OrtDecoder(b, BackendOptions(threads=1)) as dec:
        assert isinstance(dec, Decoder) and dec.backend == "onnxruntime-cpu"
        assert dec.hidden_size == table.shape[1] and dec.max_prompt == dec.max_context
        stepped = [np.array(dec.prefill(embeds))]
        assert dec.length == 9 and stepped[0].shape == (dec.vocab_size,) and stepped[0].dtype == np.float32
        for t in toks:
            stepped.append(np.array(dec.step(table[t])))
        assert dec.length == 12
        kv = dec.kv_arrays()
        assert len(kv) == 2 * dec.spec.num_layers and kv[0].shape == tuple(dec.spec.shape(12))
        full = np.concatenate([embeds[0], table[toks]])                                # [T + 3, D]
        for n, want in zip((9, 10, 11, 12), stepped):
            got = dec.prefill(full[:n])                                                 # a fresh sequence each time
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        # the KV rows of a fresh prefill equal the stepped cache's
        for a, c in zip(kv, dec.kv_arrays()):
            np.testing.assert_allclose(a, c, atol=1e-4, rtol=0)
        info = dec.info()
        assert info["backend"] == "onnxruntime-cpu" and info["kv_mode"] == dec.spec.mode
        assert info["kv_device"] == "cpu" and info["max_context"] == dec.max_context and info["kv_bytes"] > 0


def test_ort_decoder_limits(tmp_path_factory):
    b = _bundle(tmp_path_factory, "portable")
    table = load_embedding_table(b)
    dec = OrtDecoder(b, BackendOptions(threads=1), max_context=6)
    assert dec.max_context == 6
    with pytest.raises(PromptError, match="does not fit"):
        dec.prefill(np.zeros((7, table.shape[1]), np.float32))
    dec.prefill(np.zeros((5, table.shape[1]), np.float16))                 # any float dtype
    dec.step(table[1])
    with pytest.raises(PromptError, match="full"):
        dec.step(table[2])
    with pytest.raises(ConfigError, match="batch 1"):
        dec.prefill(np.zeros((2, 3, table.shape[1]), np.float32))
    dec.close()
    dec.close()                                                             # idempotent


def test_open_decoder_backends(tmp_path_factory):
    b = _bundle(tmp_path_factory, "portable")
    dec = open_decoder(b, "ort", BackendOptions(threads=1))
    assert isinstance(dec, OrtDecoder) and dec.native_info["reason"] == "backend='ort'"
    dec.close()
    # auto on a bundle without a native plan: ORT, and the reason says so
    dec = open_decoder(b, "auto", BackendOptions(threads=1))
    assert isinstance(dec, OrtDecoder) and "native_decode" in dec.native_info["reason"]
    dec.close()
    from edgevlm.runtime.native import NativeUnavailable

    with pytest.raises(NativeUnavailable, match="backend='native' but"):
        open_decoder(b, "native", BackendOptions(threads=1))
    with pytest.raises(ConfigError, match="backend must be one of"):
        open_decoder(b, "fast")
