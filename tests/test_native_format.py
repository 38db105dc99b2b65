"""Saving and loading the native adapter file, and every way a file can be wrong."""

import json

import pytest
import torch
from conftest import randomize
from safetensors import safe_open
from safetensors.torch import save_file

import ortho_diffusion as od
from ortho_diffusion.testing import tiny_text_encoder, tiny_unet, unet_inputs


def trained_unet(method="boft", **kw):
    unet = tiny_unet("sd15")
    kw = {"block_size": 8, "n_factors": 2, **kw} if method == "boft" else kw
    od.attach(unet, od.AdapterConfig(method=method, rescale=True, **kw))
    randomize(od.adapter_parameters(unet), std=0.05)
    return unet


def output(unet):
    with torch.no_grad():
        return unet(**unet_inputs(unet)).sample


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [n for n, _ in model.named_modules()]


def assert_unchanged(model, snap):
    state, names = snap
    assert [n for n, _ in model.named_modules()] == names
    now = model.state_dict()
    assert set(now) == set(state) and all(torch.equal(now[k], state[k]) for k in state)


@pytest.mark.parametrize("method", ["oft", "oftv2", "boft", "goft", "qgoft", "lroft"])
def test_round_trip_into_a_fresh_model(tmp_path, method):
    unet = trained_unet(method)
    path = od.save_adapter(unet, tmp_path / "a.safetensors")
    fresh = tiny_unet("sd15")
    od.load_adapter(fresh, path)
    assert torch.equal(output(fresh), output(unet))
    od.load_adapter(tiny_unet("sd15"), path, scale=0.0)  # loads at any strength


def test_metadata_describes_the_adapter(tmp_path):
    unet = trained_unet("boft")
    path = od.save_adapter(unet, tmp_path / "a.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    config = json.loads(meta["config.unet"])
    assert config["method"] == "boft" and config["n_factors"] == 2 and config["side"] == "input"
    assert meta["format"] == "ortho-diffusion.adapter" and meta["library_version"] == od.__version__
    assert meta["fingerprint.unet"] == od.formats.architecture_fingerprint(tiny_unet("sd15"))
    assert len(json.loads(meta["modules.unet"])) == len(od.summary(unet).rows)
    assert all(k.startswith("unet/") for k in keys)


def test_pipeline_style_file_with_two_components_loads_into_each_module(tmp_path):
    unet, te = trained_unet("oft"), tiny_text_encoder()
    od.attach(te, od.AdapterConfig(method="goft", targets="text-attn"))
    randomize(od.adapter_parameters(te), std=0.05)

    class Holder:  # duck-typed pipeline
        components = {}

        def __init__(self, unet, te):
            self.unet, self.text_encoder = unet, te

    path = od.save_adapter(Holder(unet, te), tmp_path / "both.safetensors")
    fresh = Holder(tiny_unet("sd15"), tiny_text_encoder())
    od.load_adapter(fresh, path)
    assert torch.equal(output(fresh.unet), output(unet))
    fresh_te = tiny_text_encoder()
    od.load_adapter(fresh_te, path)  # a bare text encoder picks its own component
    ids = torch.tensor([[0, 4, 5, 1]])
    with torch.no_grad():
        assert torch.equal(fresh_te(input_ids=ids).last_hidden_state, te(input_ids=ids).last_hidden_state)


def rewrite(src, dst, edit_tensors=None, edit_meta=None):
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def first_key(tensors, suffix="generators"):
    return sorted(k for k in tensors if k.endswith(suffix))[0]


BAD_FILES = {
    "missing tensor": (dict(edit_tensors=lambda t: t.pop(first_key(t))), r"missing tensors \['generators'\]"),
    "unexpected tensor": (
        dict(edit_tensors=lambda t: t.__setitem__(first_key(t).replace("generators", "extra"), torch.zeros(1))),
        r"unexpected tensors \['extra'\]",
    ),
    "wrong shape": (
        dict(edit_tensors=lambda t: t.__setitem__(first_key(t), torch.zeros(2, 4, 3))),
        r"tensor generators has shape \(2, 4, 3\), the model needs \(2, 4, 28\)",
    ),
    "unknown module": (
        dict(
            edit_tensors=lambda t: t.__setitem__("unet/nowhere.to_q/generators", torch.zeros(2, 4, 28)),
            edit_meta=lambda m: m.__setitem__("modules.unet", json.dumps(json.loads(m["modules.unet"]) + ["nowhere.to_q"])),
        ),
        r"module unet.nowhere.to_q does not exist",
    ),
    "nan values": (dict(edit_tensors=lambda t: t[first_key(t)].fill_(float("nan"))), "NaN or inf"),
    "foreign file": (dict(edit_meta=lambda m: m.__setitem__("format", "lora")), "not an ortho-diffusion adapter"),
    "damaged metadata": (dict(edit_meta=lambda m: m.pop("config.unet")), "damaged metadata"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_clear_errors_and_leave_the_model_unchanged(tmp_path, case):
    good = od.save_adapter(trained_unet("boft"), tmp_path / "good.safetensors")
    kwargs, message = BAD_FILES[case]
    bad = rewrite(good, tmp_path / "bad.safetensors", **kwargs)
    model = tiny_unet("sd15")
    snap = snapshot(model)
    with pytest.raises(od.AdapterFileError, match=message) as err:
        od.load_adapter(model, bad)
    assert "bad.safetensors" in str(err.value)
    assert_unchanged(model, snap)


def test_another_base_architecture_is_refused(tmp_path):
    path = od.save_adapter(trained_unet("oft"), tmp_path / "a.safetensors")
    other = tiny_unet("sd2")  # same widths, other layout
    snap = snapshot(other)
    with pytest.raises(od.AdapterFileError, match="another base architecture"):
        od.load_adapter(other, path)
    assert_unchanged(other, snap)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "missing"])
def test_unreadable_files(tmp_path, damage):
    good = od.save_adapter(trained_unet("oft"), tmp_path / "good.safetensors")
    bad = tmp_path / "bad.safetensors"
    data = good.read_bytes()
    if damage == "truncated":
        bad.write_bytes(data[: len(data) - 100])
    elif damage == "garbage":
        bad.write_bytes(b"\x00" * 64 + data[64:])
    elif damage == "empty":
        bad.write_bytes(b"")
    model = tiny_unet("sd15")
    snap = snapshot(model)
    with pytest.raises(od.AdapterFileError, match="bad.safetensors"):
        od.load_adapter(model, bad)
    assert_unchanged(model, snap)


def test_loading_twice_under_one_name_is_refused_and_other_names_compose(tmp_path):
    path = od.save_adapter(trained_unet("oft"), tmp_path / "subject.safetensors")
    model = tiny_unet("sd15")
    od.load_adapter(model, path)
    with pytest.raises(od.AdapterFileError, match="already attached"):
        od.load_adapter(model, path)
    od.load_adapter(model, path, adapter_name="again")
    assert {r.adapter for r in od.summary(model).rows} == {"subject", "again"}


def test_save_is_atomic_and_needs_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="no adapter is attached"):
        od.save_adapter(tiny_unet("sd15"), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())
    od.save_adapter(trained_unet("oft"), tmp_path / "x.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
