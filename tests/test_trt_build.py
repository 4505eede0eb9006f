"""Engine builds and registration without TensorRT: ``trt_build.build_engines`` against a fake ``tensorrt`` module
(per-layer fp32 pinning, a foreign timing cache, the recorded version), ``register_engines`` /
``edgevlm register-engines`` on engine files as ``build_engines.sh`` leaves them (no tensorrt, a fake one), and
``build_engines.sh`` itself end to end with a fake trtexec and the real ``edgevlm register-engines``."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from edgevlm.config import get_model_config
from edgevlm.errors import BundleError, RuntimeBackendError
from edgevlm.exporter import trt_build
from edgevlm.graphs.trt_plan import GraphFacts, plan_tensorrt_build, write_build_files

TINY = get_model_config("tiny-ldpnet")
FULL_VERSION = "10.3.0.30"


# ---- a fake tensorrt ------------------------------------------------------------------------------------------------
class _T:
    """A TensorRT enum / dtype value."""

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"trt.{self.name}"


FLOAT32, FLOAT16, INT32 = _T("float32"), _T("float16"), _T("int32")


class FakeTensor:
    def __init__(self, name, shape=(), dtype=FLOAT32):
        self.name, self.shape, self.dtype = name, shape, dtype


class FakeLayer:
    def __init__(self, name, dtypes=(FLOAT32,)):
        self.name = name
        self.outputs = [FakeTensor(f"{name}:{j}", dtype=d) for j, d in enumerate(dtypes)]
        self.precision = None
        self.output_types = {}

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_output(self, j):
        return self.outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class FakeNetwork:
    def __init__(self, inputs, layers):
        self.inputs, self.layers = inputs, layers

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, k):
        return self.inputs[k]

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, k):
        return self.layers[k]


class FakeCache:
    def __init__(self, data):
        self.data = data

    def serialize(self):
        return b"fresh timing cache" if not self.data else self.data


class FakeConfig:
    def __init__(self):
        self.flags, self.profiles, self.cache = set(), [], None
        self.default_device_type = self.DLA_core = None

    def set_memory_pool_limit(self, pool, size):
        self.workspace = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, p):
        self.profiles.append(p)

    def create_timing_cache(self, data):
        if bytes(data) == b"corrupt":
            raise RuntimeError("Deserialization of the timing cache failed")
        return FakeCache(bytes(data))

    def set_timing_cache(self, cache, ignore_mismatch):
        assert ignore_mismatch is False
        if cache.data and cache.data != b"fresh timing cache":       # written on another device / TensorRT
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache                                            # None when none was accepted


class FakeProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (lo, opt, hi)


def fake_tensorrt(networks: dict[str, FakeNetwork], *, deserialize=lambda data: object()) -> types.ModuleType:
    """A ``tensorrt`` module: the builder hands out ``networks`` by the ONNX file the parser reads."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = FULL_VERSION
    trt.float32, trt.float16, trt.int32 = FLOAT32, FLOAT16, INT32
    trt.Logger = type("Logger", (), {"WARNING": 2, "INFO": 3, "__init__": lambda self, level: None})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in ("FP16", "BF16", "INT8", "INT4", "FP8", "GPU_FALLBACK",
                                                               "OBEY_PRECISION_CONSTRAINTS")})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.DeviceType = types.SimpleNamespace(DLA="DLA", GPU="GPU")
    trt.configs = []

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return FakeNetwork([], [])                                 # the parser fills it

        def create_builder_config(self):
            cfg = FakeConfig()
            trt.configs.append(cfg)
            return cfg

        def create_optimization_profile(self):
            return FakeProfile()

        def build_serialized_network(self, net, config):
            return b"engine:" + net.name.encode()

    class OnnxParser:
        def __init__(self, holder, logger):
            self.holder, self.num_errors = holder, 0

        def parse_from_file(self, path):
            net = networks[Path(path).stem]
            self.holder.inputs, self.holder.layers = net.inputs, net.layers
            self.holder.name = Path(path).stem
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return deserialize(data)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


def _network_for(engine) -> list[FakeTensor]:
    ranks = {n: len(r.min) for p in engine.profiles for n, r in p.shapes.items()}
    return [FakeTensor(n, (-1,) * k) for n, k in ranks.items()]


def _bundle_with_plan(tmp_path: Path, plan) -> Path:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for e in plan.engines:
        (bundle / e.onnx).write_bytes(b"onnx")
    write_build_files(bundle, plan)
    return bundle


ISLANDS = ("node_pow_1", "node_Softmax_9", "node_gone")


def _decoder_layers() -> list[FakeLayer]:
    return [FakeLayer("node_pow_1"), FakeLayer("node_pow_1_17"),           # an island node and its second layer
            FakeLayer("node_Softmax_9"), FakeLayer("node_Softmax_9_4", (INT32,)),   # ... and a shape layer of it
            FakeLayer("node_pow_10"), FakeLayer("node_linear"), FakeLayer("(Unnamed Layer* 7) [Shuffle]")]


@pytest.fixture
def device(monkeypatch):
    monkeypatch.setattr(trt_build, "cuda_device", lambda: ("Orin (fake)", "8.7"))


# ---- build_engines ------------------------------------------------------------------------------------------------
def test_weak_fp16_build_pins_the_planned_fp32_layers(tmp_path, monkeypatch, caplog, device):
    plan = plan_tensorrt_build(TINY, "jetson-orin", "fp16", graphs={"decoder": GraphFacts(islands=ISLANDS)})
    assert plan.engine("decoder").fp32_layers == ISLANDS and plan.engine("vision").fp32_layers == ()
    bundle = _bundle_with_plan(tmp_path, plan)
    layers = _decoder_layers()
    nets = {"decoder": FakeNetwork(_network_for(plan.engine("decoder")), layers),
            "vision": FakeNetwork(_network_for(plan.engine("vision")), [FakeLayer("node_layer_norm")])}
    trt = fake_tensorrt(nets)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with caplog.at_level(logging.INFO, logger="edgevlm.exporter.trt_build"):
        info = trt_build.build_engines(bundle)
    vision_cfg, decoder_cfg = trt.configs
    assert "OBEY_PRECISION_CONSTRAINTS" in decoder_cfg.flags and "FP16" in decoder_cfg.flags
    assert "OBEY_PRECISION_CONSTRAINTS" not in vision_cfg.flags                 # nothing listed for vision
    by_name = {layer.name: layer for layer in layers}
    for name in ("node_pow_1", "node_pow_1_17", "node_Softmax_9"):
        assert by_name[name].precision is FLOAT32 and by_name[name].output_types == {0: FLOAT32}
    for name in ("node_Softmax_9_4", "node_pow_10", "node_linear", "(Unnamed Layer* 7) [Shuffle]"):
        assert by_name[name].precision is None and by_name[name].output_types == {}
    assert info["decoder"]["fp32_layers"] == {"planned": 3, "layers_pinned": 3, "unmatched": ["node_gone"]}
    assert "3 layer(s) pinned to fp32" in caplog.text and "node_gone" in caplog.text
    assert info["decoder"]["tensorrt"] == FULL_VERSION                      # the full version, as installed
    assert info["decoder"]["device"] == "Orin (fake)" and info["decoder"]["compute_capability"] == "8.7"
    assert (bundle / "engines" / "decoder.engine").read_bytes() == b"engine:decoder"


@pytest.mark.parametrize("foreign", [b"timing cache from an RTX 4090 / TensorRT 10.7", b"corrupt"])
def test_a_foreign_timing_cache_is_replaced_not_fatal(tmp_path, monkeypatch, caplog, device, foreign):
    plan = plan_tensorrt_build(TINY, "jetson-orin", "fp16")
    bundle = _bundle_with_plan(tmp_path, plan)
    cache = bundle / plan.timing_cache
    cache.parent.mkdir()
    cache.write_bytes(foreign)
    nets = {e.component: FakeNetwork(_network_for(e), [FakeLayer("x")]) for e in plan.engines}
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(nets))
    with caplog.at_level(logging.WARNING, logger="edgevlm.exporter.trt_build"):
        info = trt_build.build_engines(bundle)
    assert str(cache) in caplog.text and "fresh cache" in caplog.text
    assert info["vision"]["timing_cache"] == "replaced"                     # the first build replaced it
    assert info["decoder"]["timing_cache"] == "loaded"                      # the second loaded the new file
    assert cache.read_bytes() == b"fresh timing cache"
    assert set(info) == {"vision", "decoder"}


# ---- register_engines -----------------------------------------------------------------------------------------------
def _tensorrt_bundle(tmp_path: Path, target: str = "jetson-orin") -> tuple[Path, object]:
    """A minimal TensorRT bundle (valid manifest, dummy graphs) with its build plan and script."""
    from edgevlm.bundle import BundleWriter, model_entry, prompt_entry
    from edgevlm.graphs.spec import kv_cache_entry
    from edgevlm.preprocess import PreprocessConfig
    from edgevlm.targets import get_target

    cfg, tgt = TINY, get_target(target)
    plan = plan_tensorrt_build(cfg, tgt, "fp16")
    dest = tmp_path / "bundle"
    with BundleWriter(dest) as w:
        for name in ("vision.onnx", "decoder.onnx"):
            (w.root / name).write_bytes(b"onnx graph " + name.encode())
        np.save(w.root / "embed_tokens.npy", np.zeros((cfg.llm.vocab_size, cfg.llm.hidden_size), np.float16))
        w.path("tokenizer/tokenizer.json").write_text('{"model": {}}')
        plan_path, script_path = write_build_files(w.root, plan)
        w.set_manifest({
            "model": model_entry(cfg, random_init=True, source="random-init"), "visual_tokens": cfg.visual_tokens,
            "prompt": prompt_entry("vicuna_v1", bos_token_id=1, eos_token_id=2, pad_token_id=0),
            "preprocess": PreprocessConfig(image_size=cfg.vision.image_size).to_dict(),
            "tokenizer": {"file": "tokenizer/tokenizer.json", "files": ["tokenizer/tokenizer.json"]},
            "target": tgt.to_dict(), "precision": "fp16",
            "components": {"vision": {"file": "vision.onnx", "precision": "fp16"},
                           "embed": {"file": "embed_tokens.npy", "kind": "table"},
                           "decoder": {"file": "decoder.onnx", "precision": "fp16",
                                       "kv_cache": kv_cache_entry(cfg, "float32")}},
            "tensorrt": {"plan": plan.to_dict(), "plan_file": plan_path.name, "script": script_path.name,
                         "compat_warnings": {}, "engines": {}}})
    return dest, plan


def _fake_engines(bundle: Path, plan) -> None:
    for e in plan.engines:
        (bundle / e.engine).parent.mkdir(exist_ok=True)
        (bundle / e.engine).write_bytes(b"serialized " + e.component.encode())


def test_register_engines_records_them_like_build_engine(tmp_path, monkeypatch):
    from edgevlm.bundle import read_bundle
    from edgevlm.cli.engine import register_bundle_engines

    bundle, plan = _tensorrt_bundle(tmp_path)
    with pytest.raises(BundleError, match="build_engines.sh"):
        register_bundle_engines(bundle, tensorrt="10.3.0")                    # nothing built yet
    _fake_engines(bundle, plan)
    monkeypatch.setitem(sys.modules, "tensorrt", None)                        # no tensorrt on this machine
    monkeypatch.setattr(trt_build, "cuda_device", lambda: None)
    _, results = register_bundle_engines(bundle, tensorrt="10.3.0")
    b = read_bundle(bundle, verify_hashes=True)                               # the engines are hashed in
    engines = b.manifest["tensorrt"]["engines"]
    assert set(engines) == {"vision", "decoder"} and engines == results
    dec = engines["decoder"]
    assert dec["file"] == "engines/decoder.engine" and dec["file"] in b.files
    assert dec["sha256"] == hashlib.sha256(b"serialized decoder").hexdigest()
    assert dec["bytes"] == len(b"serialized decoder") and b.files[dec["file"]]["sha256"] == dec["sha256"]
    assert dec["tensorrt"] == "10.3.0" and dec["built_by"] == "build_engines.sh" and "build_s" not in dec
    assert dec["builder_mode"] == "weak" and dec["precision_flags"] == ["fp16"] and dec["dla_core"] is None
    assert [p["name"] for p in dec["profiles"]] == ["prefill", "decode"] and dec["target"] == plan.target
    assert dec["device"] is None and dec["compute_capability"] is None
    assert dec["validated"] is False and "tensorrt" in dec["validation"]
    # the runtime accepts the entry (same TensorRT major.minor)
    from edgevlm.runtime.trt_backend import check_engine_entry, engine_entries

    check_engine_entry("decoder", engine_entries(b.manifest)["decoder"], "10.3.0.30", ("Orin", "8.7"))


def test_register_engines_deserializes_them_when_tensorrt_is_here(tmp_path, monkeypatch, device):
    bundle, plan = _tensorrt_bundle(tmp_path)
    _fake_engines(bundle, plan)
    seen = []
    trt = fake_tensorrt({}, deserialize=lambda data: seen.append(data) or object())
    info = trt_build.register_engines(bundle, trt=trt)                         # version from the package
    assert all(m["validated"] is True and m["tensorrt"] == FULL_VERSION for m in info.values())
    assert sorted(seen) == [b"serialized decoder", b"serialized vision"]
    assert info["vision"]["device"] == "Orin (fake)"
    broken = fake_tensorrt({}, deserialize=lambda data: None)
    with pytest.raises(RuntimeBackendError, match="does not deserialize"):
        trt_build.register_engines(bundle, trt=broken)
    # engines built by another TensorRT than the installed one: recorded, not deserialized
    info = trt_build.register_engines(bundle, tensorrt="10.7.0", trt=trt)
    assert info["decoder"]["validated"] is False and "10.7.0" in info["decoder"]["validation"]
    with pytest.raises(RuntimeBackendError, match="another major version"):
        trt_build.register_engines(bundle, tensorrt="11.4.1", trt=trt)


def test_register_engines_cli(tmp_path, monkeypatch, capsys):
    from edgevlm.cli import main

    bundle, plan = _tensorrt_bundle(tmp_path)
    _fake_engines(bundle, plan)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["register-engines", str(bundle), "--tensorrt", "10.3.0"]) == 0
    assert "engines/decoder.engine" in capsys.readouterr().out
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["tensorrt"]["engines"]["vision"]["tensorrt"] == "10.3.0"


FAKE_TRTEXEC = """#!/usr/bin/env bash
echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b30] # trtexec $*"
for a in "$@"; do
  case "$a" in --saveEngine=*) out="${a#--saveEngine=}"; echo "engine $out" > "$out";; esac
done
"""


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash")
def test_build_engines_sh_registers_its_engines(tmp_path):
    """The bundle's script with a fake trtexec, then the real `edgevlm register-engines`: the manifest lists the
    engines (before: "no engines built yet")."""
    from edgevlm.bundle import read_bundle

    bundle, plan = _tensorrt_bundle(tmp_path)
    fake = tmp_path / "trtexec"
    fake.write_text(FAKE_TRTEXEC)
    fake.chmod(0o755)
    env = {**os.environ, "TRTEXEC": str(fake), "EDGEVLM": f"{sys.executable} -m edgevlm"}
    r = subprocess.run(["bash", str(bundle / "build_engines.sh")], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    engines = read_bundle(bundle, verify_hashes=True).manifest["tensorrt"]["engines"]
    assert set(engines) == {"vision", "decoder"}
    assert all(e["tensorrt"] == "10.3.0" and e["built_by"] == "build_engines.sh" for e in engines.values())
