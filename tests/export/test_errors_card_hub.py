"""Export refusals, corrupt checkpoints, the model card, the Hub push (mocked), exports of checkpoint dirs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import hf_qat
from hf_qat import QATCallback, QATConfig, QATModelError
from hf_qat.export import ExportFormatError, export_checkpoint, load_exported
from helpers import make_trainer, qat_trained_model, tiny_llama, without_package

INPUT = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def test_a_format_that_cannot_represent_the_model_names_the_ones_that_can(tmp_path):
    model = qat_trained_model(QATConfig(start=0, bits=3, group_size=16))
    with pytest.raises(ExportFormatError, match=r"format 'gguf' cannot .*Formats that can: compressed-tensors, hf-qat"):
        export_checkpoint(model, tmp_path / "g", format="gguf")
    with pytest.raises(ExportFormatError, match=r"'bitnet' cannot .*ternary"):
        export_checkpoint(model, tmp_path / "b", format="bitnet")
    emb = qat_trained_model(QATConfig(start=0, bits=4, group_size=16, embedding_bits=4))
    with pytest.raises(ExportFormatError, match=r"Linear layers only.*Formats that can: hf-qat"):
        export_checkpoint(emb, tmp_path / "c", format="compressed-tensors")
    with pytest.raises(ValueError, match=r"format 'onnx' is not known"):
        export_checkpoint(model, tmp_path / "o", format="onnx")


def test_bf16_weights_with_fp16_scales_cannot_go_to_compressed_tensors(tmp_path):
    # A bf16 scale rounded to fp16 stays bf16-exact, but the ternary step fp16(s * 2/3) has up to 11
    # significant bits, which bf16 (8 bits) cannot hold: compressed-tensors stores scales in bf16 here.
    model = tiny_llama().to(torch.bfloat16)
    hf_qat.ptq(model, QATConfig(start=0, bits="ternary", group_size=16, scale_dtype="float16"))
    with pytest.raises(ExportFormatError, match=r"not representable in the weight dtype torch.bfloat16"):
        export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    export_checkpoint(model, tmp_path / "native", format="hf-qat")  # the native format keeps fp16 steps


def test_gguf_needs_a_matching_tokenizer(tmp_path):
    from hf_qat.demo.corpus import train_tokenizer

    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=32), hidden=64)
    with pytest.raises(ExportFormatError, match="pass export_checkpoint\\(..., tokenizer=...\\)"):
        export_checkpoint(model, tmp_path / "g", format="gguf")
    with pytest.raises(ExportFormatError, match="model's vocabulary is 64"):
        export_checkpoint(model, tmp_path / "h", format="gguf", tokenizer=train_tokenizer(["def f(): pass\n" * 20], 300))


def test_export_before_the_switch_is_refused(tmp_path):
    model = hf_qat.prepare_model_for_qat(tiny_llama(), QATConfig(start=10))
    with pytest.raises(QATModelError, match="has not switched to QAT yet"):
        export_checkpoint(model, tmp_path / "x")
    with pytest.raises(QATModelError, match="no QAT modules"):
        export_checkpoint(tiny_llama(), tmp_path / "y")


@pytest.fixture()
def native_export(tmp_path):
    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=16))
    export_checkpoint(model, tmp_path / "good", format="hf-qat")
    return tmp_path, model


def _copy(tmp_path, name):
    target = tmp_path / name
    shutil.copytree(tmp_path / "good", target)
    return target


KEY = "model.layers.0.mlp.up_proj"


def _edit_tensors(directory, fn):
    tensors = load_file(directory / "model.safetensors")
    fn(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_corrupt_native_checkpoints_fail_clearly(native_export):
    from transformers import AutoModelForCausalLM

    tmp_path, model = native_export
    truncated = _copy(tmp_path, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    missing = _copy(tmp_path, "missing")
    _edit_tensors(missing, lambda t: t.pop(f"{KEY}.weight_step"))
    shapes = _copy(tmp_path, "shapes")
    _edit_tensors(shapes, lambda t: t.__setitem__(f"{KEY}.weight_packed", t[f"{KEY}.weight_packed"][:, :-1].contiguous()))
    config = _copy(tmp_path, "config")
    spec = json.loads((config / "config.json").read_text())
    spec["quantization_config"]["modules"][KEY]["shape"] = [128, 32]
    (config / "config.json").write_text(json.dumps(spec))

    for bad in (truncated, missing, shapes, config):  # the manifest catches every one
        with pytest.raises(ValueError, match="corrupt|incomplete"):
            load_exported(bad)
    # Plain transformers (hf_qat imported for the native quantizer) refuses them too:
    with pytest.raises((SafetensorError, OSError), match="deserializing header|incomplete"):
        AutoModelForCausalLM.from_pretrained(truncated)
    with pytest.raises(QATModelError, match=rf"lacks 1 packed tensors .*{KEY}.weight_step"):
        AutoModelForCausalLM.from_pretrained(missing)
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(shapes)
    with pytest.raises(QATModelError, match=r"says model.layers.0.mlp.up_proj is \(128, 32\).*disagree"):
        AutoModelForCausalLM.from_pretrained(config)
    assert torch.equal(load_exported(tmp_path / "good")(INPUT).logits, model(INPUT).logits)


def test_corrupt_compressed_tensors_export_is_refused_by_load_exported(tmp_path):
    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=16))
    export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    _edit_tensors(tmp_path / "ct", lambda t: t.pop(f"{KEY}.weight_scale"))
    with pytest.raises(ValueError, match="corrupt"):
        load_exported(tmp_path / "ct")


def test_model_card(tmp_path):
    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=16))
    plan = hf_qat.plan_qat(0.2e6, 3e6, 4, total_steps=1500)
    export_checkpoint(model, tmp_path / "ct", format="compressed-tensors", base_model="HuggingFaceTB/SmolLM2-135M", plan=plan,
                      card={"eval": {"held-out loss": 2.81}, "training_tokens": 3.07e6})
    text = (tmp_path / "ct" / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["base_model"] == "HuggingFaceTB/SmolLM2-135M" and header["base_model_relation"] == "quantized"
    assert header["library_name"] == "transformers" and {"hf_qat", "4-bit", "compressed-tensors"} <= set(header["tags"])
    for expected in ("| weight bits | 4 |", "| group size | 16 |", "switch step", "tokens per parameter byte",
                     "| held-out loss | 2.8100 |", "| training tokens | 3.07e+06 |", "compressed-tensors pack-quantized"):
        assert expected in text, expected
    export_checkpoint(model, tmp_path / "native", format="hf-qat")
    assert "Install and import hf_qat before loading" in (tmp_path / "native" / "README.md").read_text()


def test_push_to_hub_uses_one_commit_through_a_mocked_transport(tmp_path, monkeypatch):
    import httpx2
    import huggingface_hub

    calls = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        calls.append((request.method, path))
        if path.endswith("/api/repos/create"):
            return httpx2.Response(200, json={"url": "https://huggingface.co/me/tiny-qat", "name": "me/tiny-qat"})
        if path.endswith("/api/validate-yaml"):
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                        for f in files], "commitOid": "0" * 40})
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line]
            calls.append(("files", sorted(line["value"]["path"] for line in lines if line["key"] == "file")))
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny-qat/commit/abc",
                                              "commitOid": "a" * 40, "success": True})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})

    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler)))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        model = qat_trained_model(QATConfig(start=0, bits=4, group_size=16))
        export_checkpoint(model, tmp_path / "out", format="compressed-tensors", push_to_hub="me/tiny-qat", token="hf_test")
    finally:
        huggingface_hub.set_client_factory(lambda: httpx2.Client())
    commits = [c for c in calls if c[0] == "POST" and "/commit/" in c[1]]
    assert len(commits) == 1
    uploaded = next(c[1] for c in calls if c[0] == "files")
    assert {"README.md", "config.json", "model.safetensors", "hf_qat_export.json"} <= set(uploaded)


def test_export_from_a_trainer_checkpoint_directory(tmp_path):
    cfg = QATConfig(bits=4, group_size=16, start=4, manage_schedule=False)
    trainer = make_trainer(tmp_path / "run", [QATCallback(cfg)], max_steps=8, save_strategy="steps", save_steps=8)
    trainer.train()
    info = export_checkpoint(tmp_path / "run" / "checkpoint-8", tmp_path / "export", format="hf-qat")
    with torch.no_grad():
        expected = trainer.model.eval()(INPUT).logits
        assert torch.equal(load_exported(tmp_path / "export")(INPUT).logits, expected)
    manifest = json.loads((tmp_path / "export" / "hf_qat_export.json").read_text())
    assert manifest["plan"]["switch_step"] == 4 and info.format == "hf-qat"
    with pytest.raises(FileNotFoundError, match="checkpoint-9 does not exist"):  # a typo, said as such
        export_checkpoint(tmp_path / "run" / "checkpoint-9", tmp_path / "e2", format="hf-qat")
    with pytest.raises(FileNotFoundError, match="has no qat_config.json: not a checkpoint of a QAT run"):
        export_checkpoint(tmp_path / "export", tmp_path / "e3", format="hf-qat")


def test_export_to_a_relative_directory_with_a_tokenizer(tmp_path, monkeypatch):
    from hf_qat.demo.corpus import train_tokenizer

    monkeypatch.chdir(tmp_path)
    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=16))
    info = export_checkpoint(model, "out/export", format="compressed-tensors",
                             tokenizer=train_tokenizer(["def f(): pass\n" * 20], 300))
    assert "tokenizer.json" in info.files and "tokenizer_config.json" in info.files
    assert all(not f.startswith("out") for f in info.files)
    assert load_exported("out/export") is not None



def test_a_missing_loader_package_is_named_before_loading_and_before_training(tmp_path, monkeypatch):
    from hf_qat.export import check_loadable

    model = qat_trained_model(QATConfig(start=0, bits=4, group_size=16))
    export_checkpoint(model, tmp_path / "ct", format="compressed-tensors")
    fresh = tiny_llama()
    hf_qat.prepare_model_for_qat(fresh, QATConfig(start=0, bits=4, group_size=16))
    check_loadable(fresh)  # installed here: nothing to say
    without_package(monkeypatch, "compressed_tensors")
    needs = r"loading a compressed-tensors export with transformers needs the compressed_tensors package \(pip install 'hf_qat\[export\]'\)"
    with pytest.raises(ImportError, match=needs):
        load_exported(tmp_path / "ct")
    with pytest.raises(ImportError, match=needs):
        check_loadable(fresh)  # format="auto" picks compressed-tensors for int4 groups
    check_loadable(fresh, format="hf-qat")  # the native format needs only hf_qat
    three = tiny_llama()
    hf_qat.prepare_model_for_qat(three, QATConfig(start=0, bits=3, group_size=16))
    check_loadable(three)  # auto picks hf-qat for 3-bit codes: compressed-tensors is not needed
    with pytest.raises(ExportFormatError, match=r"QATConfig.export_format='gguf'.*cannot"):
        check_loadable(three, format="gguf")  # a named format must hold the layers
    with pytest.raises(ValueError, match=r"format 'onnx' is not known"):
        check_loadable(three, format="onnx")
    with pytest.raises(QATModelError, match=r"not prepared for QAT"):
        check_loadable(tiny_llama())
    q4_0 = tiny_llama()
    hf_qat.prepare_model_for_qat(q4_0, QATConfig(start=0, bits=4, group_size=32))
    check_loadable(q4_0, format="gguf")
    without_package(monkeypatch, "gguf")
    with pytest.raises(ImportError, match=r"a gguf export with transformers needs the gguf package"):
        check_loadable(q4_0, format="gguf")
