"""One source of truth: the network specs, the catalogue, the architecture choices and the records agree,
and match the official facts of the reference (checkpoint, URL, licence, native input, preprocessing)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from depthsite import netspecs
from depthsite.netspecs import NET_NAMES, NET_SPECS, NetSpec, net_spec
from models_registry import catalogue
from models_registry.catalogue import CATALOGUE, DEFAULT_MODEL, key_layout, key_layout_path
from models_registry.choices import Architecture, architecture_choices
from models_registry.models import RegisteredModel

FACTS = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "reference" / "catalogue_facts.json")
                   .read_text())["models"]
ROOT = Path(__file__).resolve().parents[2]
CONTRACT_NAMES = (
    "DPT_Large", "DPT_Hybrid", "MiDaS", "MiDaS_small",
    "DPT_BEiT_L_512", "DPT_BEiT_L_384", "DPT_BEiT_B_384", "DPT_SwinV2_L_384", "DPT_SwinV2_B_384",
    "DPT_SwinV2_T_256", "DPT_Swin_L_384", "DPT_LeViT_224",
    "Depth_Anything_V2_Small", "Depth_Anything_V2_Base", "Depth_Anything_V2_Large",
)


def _entry(name: str) -> catalogue.CatalogueEntry:
    return next(entry for entry in catalogue.CATALOGUE if entry.name == name)


def test_one_name_list_in_the_contract_order():
    assert NET_NAMES == CONTRACT_NAMES
    assert tuple(entry.name for entry in CATALOGUE) == CONTRACT_NAMES
    assert all(entry.architecture == entry.name for entry in CATALOGUE)
    assert [value for value, _ in architecture_choices()] == list(CONTRACT_NAMES)
    assert Architecture.DPT_BEIT_L_512 == "DPT_BEiT_L_512"
    assert DEFAULT_MODEL == "MiDaS_small"


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_catalogue_and_spec_match_the_official_facts(name):
    entry, facts, spec = _entry(name), FACTS[name], net_spec(name)
    assert entry.file_name == facts["checkpoint_file"]
    assert entry.source_url == facts["checkpoint_url"]
    assert entry.license == facts["license"]
    assert entry.params == facts["n_params"]
    assert entry.approx_bytes == facts["tensor_bytes"]
    assert list(spec.net_size) == facts["native_size"] and entry.input_size == facts["native_size"][0]
    assert spec.resize_method == facts["resize_method"]
    assert spec.keep_aspect_ratio == facts["keep_aspect_ratio"]
    assert spec.ensure_multiple_of == facts["multiple_of"]
    assert list(spec.mean) == facts["mean"] and list(spec.std) == facts["std"]
    # The catalogue restates nothing: its preprocessing IS the spec's.
    assert entry.preprocessing == spec.preprocessing and entry.spec is spec


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_key_layout_agrees_with_the_catalogue(name):
    if not key_layout_path(name).exists():
        pytest.skip(f"keys_{name}.json is added with the {name} network (another branch); not on this one")
    layout = key_layout(name)
    data = json.loads(key_layout_path(name).read_text())
    assert layout.tensor_bytes == _entry(name).approx_bytes
    assert data["checkpoint_file"] == _entry(name).file_name
    assert name in catalogue.ARCHITECTURES


def test_aliases_are_unambiguous():
    seen: dict[str, str] = {}
    for entry in CATALOGUE:
        for word in (entry.name, *entry.aliases):
            normal = word.lower().replace("-", "_")
            assert seen.setdefault(normal, entry.name) == entry.name, f"{word} names two models"


def test_every_licence_has_a_note_and_only_small_depth_anything_is_commercial():
    assert {entry.license for entry in CATALOGUE} <= set(catalogue.LICENSES)
    non_commercial = {entry.name for entry in CATALOGUE if entry.license == "CC-BY-NC-4.0"}
    assert non_commercial == {"Depth_Anything_V2_Base", "Depth_Anything_V2_Large"}


def test_spec_refuses_bad_values():
    good = dict(name="x", family="dpt", net_size=(384, 384), resize_method="minimal", mean=(0.5,) * 3, std=(0.5,) * 3)
    NetSpec(**good)
    for bad in ({"resize_method": "crop"}, {"net_size": (0, 384)}, {"ensure_multiple_of": 0}, {"std": (0.5, 0, 0.5)}):
        with pytest.raises(ValueError):
            NetSpec(**{**good, **bad})


def test_nets_config_is_the_spec_and_a_contradiction_is_refused():
    from inference.nets import get_config
    from inference.nets.registry import NetConfig, register_variant

    assert NetConfig is NetSpec
    for name in ("DPT_Large", "DPT_Hybrid", "MiDaS", "MiDaS_small"):
        assert get_config(name) is NET_SPECS[name]
    # The constructor the net files use keeps working, with the fields the new families add.
    restated = NetConfig(name="MiDaS_small", family="midas_v21_small", net_size=(256, 256), resize_method="upper_bound",
                         mean=netspecs.IMAGENET_MEAN, std=netspecs.IMAGENET_STD, ensure_multiple_of=32,
                         keep_aspect_ratio=True, description="restated")
    with pytest.raises(ValueError, match="already registered"):
        register_variant(restated, object(), lambda arch, **_: None)
    wrong = NetConfig(name="DPT_LeViT_224", family="levit", net_size=(224, 224), resize_method="minimal",
                      mean=netspecs.HALF_MEAN, std=netspecs.HALF_STD, keep_aspect_ratio=True)
    with pytest.raises(ValueError, match="keep_aspect_ratio"):
        register_variant(wrong, object(), lambda arch, **_: None)
    unknown = NetConfig(name="DPT_Next_ViT_L_384", family="dpt", net_size=(384, 384), resize_method="minimal",
                        mean=netspecs.HALF_MEAN, std=netspecs.HALF_STD)
    with pytest.raises(ValueError, match="netspecs"):
        register_variant(unknown, object(), lambda arch, **_: None)


def test_catalogue_and_specs_do_not_import_torch_or_django():
    code = ("import sys; import depthsite.netspecs, models_registry.catalogue; "
            "bad = [m for m in ('torch', 'django', 'inference') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the records --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_record_facts_are_derived_from_the_architecture():
    custom = RegisteredModel.objects.create(name="my_hybrid", display_name="mine", architecture="DPT_Hybrid",
                                            file_name="mine.pt")
    assert custom.input_size == 384 and custom.preprocessing == NET_SPECS["DPT_Hybrid"].preprocessing
    custom.architecture = "MiDaS_small"
    assert custom.input_size == 256 and custom.preprocessing["resize_method"] == "upper_bound"
    # Stating a size is accepted only when it agrees: one that would silently do nothing is an error.
    RegisteredModel(name="ok", architecture="MiDaS_small", input_size=256)
    with pytest.raises(ValueError, match="contradicts"):
        RegisteredModel(name="bad", architecture="MiDaS_small", input_size=384)
    seeded = RegisteredModel.objects.get(name="Depth_Anything_V2_Large")
    assert seeded.input_size == 518 and seeded.license == "CC-BY-NC-4.0"
    assert not any(field.name in ("input_size", "preprocessing") for field in RegisteredModel._meta.get_fields())


@pytest.mark.django_db
def test_admin_shows_the_facts_read_only(admin_client):
    model = RegisteredModel.objects.get(name="DPT_SwinV2_T_256")
    page = admin_client.get(f"/admin/models_registry/registeredmodel/{model.pk}/change/").content.decode()
    assert "resize_method=minimal" in page and "keep_aspect_ratio=False" in page and "256 px" in page
    assert 'name="input_size"' not in page and 'name="preprocessing"' not in page
    assert 'value="Depth_Anything_V2_Small"' in page  # the new architectures are choices


# --- what users see to choose ------------------------------------------------------------------


@pytest.fixture
def cpu_times(tmp_path, monkeypatch):
    path = tmp_path / "cpu_times.json"
    path.write_text(json.dumps({"machine": "test box", "models": {
        "MiDaS_small": {"median_s": 0.07}, "MiDaS": {"median_s": 0.9}, "DPT_LeViT_224": {"median_s": 0.08}}}))
    monkeypatch.setattr(catalogue, "CPU_TIMES_FILE", path)
    catalogue._cpu_times.cache_clear()
    yield path
    catalogue._cpu_times.cache_clear()


def test_cpu_seconds_come_from_the_data_file(cpu_times):
    assert catalogue.cpu_seconds("MiDaS_small") == 0.07
    assert catalogue.cpu_seconds("DPT_Large") is None
    assert catalogue.cpu_times_machine() == "test box"


def test_the_committed_cpu_times_cover_the_original_models():
    catalogue._cpu_times.cache_clear()
    for name in ("DPT_Large", "DPT_Hybrid", "MiDaS", "MiDaS_small"):
        assert catalogue.cpu_seconds(name) and catalogue.cpu_seconds(name) > 0


@pytest.mark.django_db
def test_models_list_groups_by_family_with_size_input_time_and_licence(cpu_times):
    from django.core.management import call_command
    from io import StringIO

    out = StringIO()
    call_command("models", "list", "--json", stdout=out)
    rows = json.loads(out.getvalue())
    assert [row["name"] for row in rows][:2] == ["MiDaS_small", "MiDaS"]  # family order, fastest first
    families = [row["family_label"] for row in rows]
    assert families == sorted(families, key=families.index) and len(set(families)) == 7
    small = rows[0]
    assert small["default"] and small["cpu_seconds"] == 0.07 and small["input_size"] == 256
    assert small["approx_bytes"] == _entry("MiDaS_small").approx_bytes
    large = next(row for row in rows if row["name"] == "Depth_Anything_V2_Large")
    assert large["license"] == "CC-BY-NC-4.0" and large["license_accepted"] and large["input_size"] == 518

    out = StringIO()
    call_command("models", "list", stdout=out)
    text = out.getvalue()
    assert text.index("MiDaS v2.1 (CNN)") < text.index("Depth Anything V2")
    assert "MiDaS_small*" in text and "CC-BY-NC-4.0" in text and "0.07" in text and "test box" in text


@pytest.mark.django_db
def test_upload_form_groups_models_by_family(client, settings, cpu_times):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    page = client.get("/").content.decode()
    for label in netspecs.FAMILIES.values():
        assert f'data-family="{label}"' in page
    assert page.index('data-family="MiDaS v2.1 (CNN)"') < page.index('value="MiDaS_small"') \
        < page.index('data-family="MiDaS v3 DPT (ViT)"')
    assert "0.07 s/image on CPU" in page and "CC-BY-NC-4.0" in page and "(stretched square)" in page
    assert 'value="MiDaS_small" checked' in page


def test_bench_prints_the_readme_table_without_torch():
    done = subprocess.run([sys.executable, "bench/forward.py", "--markdown"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(CONTRACT_NAMES)
    large = next(row for row in rows if "Depth_Anything_V2_Large" in row)
    assert "CC-BY-NC-4.0" in large and "Depth Anything V2" in large
    # Both paths' times and their ratio, all from the committed measurement (no typed-in reference times).
    measured = json.loads((ROOT / "models_registry" / "catalogue" / "cpu_times.json").read_text())
    entry = measured["models"]["Depth_Anything_V2_Large"]
    assert f"| {entry['median_s']:.3f} | {entry['eager_s']:.3f} | {entry['ratio']:.2f}x |" in large


@pytest.mark.slow
def test_bench_measures_every_requested_net_and_merges_its_medians(tmp_path):
    output = tmp_path / "cpu_times.json"
    output.write_text(json.dumps({"models": {"DPT_Large": {"median_s": 2.5}}}))
    done = subprocess.run([sys.executable, "bench/forward.py", "--models", "MiDaS_small", "--repeats", "2",
                           "--threads", "1", "--write", "--output", str(output), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)["models"]["MiDaS_small"]
    assert printed["ratio"] == pytest.approx(printed["depthsite_s"] / printed["eager_s"], rel=0.01)
    assert printed["max_diff_of_range"] <= 2e-5  # the ONNX path computes what eager computes
    assert "MiDaS_small" in done.stderr and "x " in done.stderr  # the table, with its ratio column
    data = json.loads(output.read_text())
    assert data["models"]["DPT_Large"]["median_s"] == 2.5  # kept
    small = data["models"]["MiDaS_small"]
    assert small["input"] == [256, 256] and len(small["runs_s"]) == 2 and small["median_s"] > 0
    assert small["path"] == "onnx" and small["eager_s"] > 0
    assert "1 thread" in data["machine"]


@pytest.mark.django_db
def test_a_row_with_an_unknown_architecture_is_listed_not_a_server_error(admin_client):
    RegisteredModel.objects.filter(name="MiDaS").update(architecture="DPT_Next_ViT_L_384")  # forced past validation
    model = RegisteredModel.objects.get(name="MiDaS")
    assert model.input_size is None and model.preprocessing == {}
    body = admin_client.get("/api/models/MiDaS/")
    assert body.status_code == 200 and body.json()["input_size"] is None
    assert admin_client.get("/api/models/").status_code == 200
    assert admin_client.get("/models/").status_code == 200
    assert admin_client.get(f"/admin/models_registry/registeredmodel/{model.pk}/change/").status_code == 200
    from django.core.management import call_command
    from io import StringIO

    out = StringIO()
    call_command("models", "list", stdout=out)
    assert "unknown architecture" in out.getvalue()


def test_the_configs_the_new_net_files_state_agree_with_the_specs():
    """Exactly the NetConfig(...) calls of the v3.1 and Depth Anything V2 net files: restating is fine."""
    from inference.nets.registry import NetConfig, _canonical

    half = dict(resize_method="minimal", mean=netspecs.HALF_MEAN, std=netspecs.HALF_STD)
    for name, size in (("DPT_BEiT_L_512", 512), ("DPT_BEiT_L_384", 384), ("DPT_BEiT_B_384", 384)):
        assert _canonical(NetConfig(name=name, family="beit", net_size=(size, size), description="x", **half)) \
            is NET_SPECS[name]
    for name, size in (("DPT_SwinV2_T_256", 256), ("DPT_Swin_L_384", 384), ("DPT_LeViT_224", 224)):
        stated = NetConfig(name=name, family="swin", net_size=(size, size), keep_aspect_ratio=False,
                           fixed_input_size=True, **half)
        assert _canonical(stated) is NET_SPECS[name]
    for name in ("Depth_Anything_V2_Small", "Depth_Anything_V2_Large"):
        stated = NetConfig(name=name, family="depth_anything_v2", net_size=(518, 518), resize_method="lower_bound",
                           mean=netspecs.IMAGENET_MEAN, std=netspecs.IMAGENET_STD, ensure_multiple_of=14,
                           output_interpolation="bilinear", output_align_corners=True, max_net_side=4 * 518)
        assert _canonical(stated) is NET_SPECS[name]
    with pytest.raises(ValueError, match="output_interpolation"):
        _canonical(NetConfig(name="Depth_Anything_V2_Base", family="depth_anything_v2", net_size=(518, 518),
                             resize_method="lower_bound", mean=netspecs.IMAGENET_MEAN, std=netspecs.IMAGENET_STD,
                             ensure_multiple_of=14, output_align_corners=True, max_net_side=4 * 518))
