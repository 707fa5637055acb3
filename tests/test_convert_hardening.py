"""Checkpoints that contradict themselves, shipped chat templates against mistral-common, a missing tokenizer,
and the two outputs of one conversion landing whole or not at all (a failed second rename rolls the first back)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from mistral_common.integrations.chat_templates.chat_templates import convert_tokenizer_to_chat_template
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import HF, NATIVE
from convert.errors import ConversionError
from convert.vocab import derived_chat_template, template_disagreement
from convert.writer import convert_checkpoint
from helpers import assert_one_line_error, run_cli
from quant.gguf_io import read_header

real_replace = os.replace
BIG = (".safetensors",)  # linked, not copied: the tests never change weights, only the small files beside them


def copy_checkpoint(source: Path, target: Path) -> Path:
    """The fixture's small files copied (to change), its weight files symlinked (read only)."""
    target.mkdir()
    for path in source.iterdir():
        if path.name.endswith(BIG):
            (target / path.name).symlink_to(path)
        else:
            shutil.copy(path, target / path.name)
    return target


@pytest.fixture
def hf_copy(checkpoint, tmp_path) -> Path:
    return copy_checkpoint(checkpoint(HF), tmp_path / "ckpt")


@pytest.fixture
def native_copy(checkpoint, tmp_path) -> Path:
    return copy_checkpoint(checkpoint(NATIVE), tmp_path / "ckpt")


def edit_json(path: Path, change) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def template_of(gguf: Path) -> str:
    return read_header(gguf).fields["tokenizer.chat_template"]


# --- 1. tensors the plan does not consume ---------------------------------------------------------


def test_config_with_fewer_layers_than_the_weights_refused(hf_copy, tmp_path):
    """Config says 1 layer, the weights hold 2: once a 1-layer GGUF that ran; now refused before writing."""
    edit_json(hf_copy / "config.json", lambda c: c["text_config"].update(num_hidden_layers=1))
    result = run_cli("convert", hf_copy, "-o", tmp_path / "out.gguf")
    assert_one_line_error(result, "tensors its config does not account for", "language_model.model.layers.1.")
    assert leftovers(tmp_path) == ["ckpt"]


def test_native_params_with_fewer_layers_refused(native_copy, tmp_path):
    edit_json(native_copy / "params.json", lambda p: p.update(n_layers=1))
    result = run_cli("convert", native_copy, "-o", tmp_path / "out.gguf")
    assert_one_line_error(result, "tensors its config does not account for", "layers.1.")
    assert leftovers(tmp_path) == ["ckpt"]


def test_vision_weights_without_a_vision_config_refused(hf_copy, tmp_path):
    """A config without vision_config over weights with a vision tower: the two disagree."""
    edit_json(hf_copy / "config.json", lambda c: c.pop("vision_config"))
    result = run_cli("convert", hf_copy, "-o", tmp_path / "out.gguf")
    assert_one_line_error(result, "tensors its config does not account for", "multi_modal_projector.")
    assert leftovers(tmp_path) == ["ckpt"]


# --- 2. the shipped chat template against mistral-common --------------------------------------------


@pytest.fixture(scope="module")
def mistral(checkpoint) -> MistralTokenizer:
    return MistralTokenizer.from_file(checkpoint(HF) / "tekken.json")


def test_derived_template_is_mistral_commons(checkpoint, mistral):
    """Our template from the loaded tokenizer is what mistral-common derives from the file (which reloads it)."""
    expected = convert_tokenizer_to_chat_template(checkpoint(HF) / "tekken.json", use_special_token_variables=False,
                                                  plain_thinking_support=False)
    assert derived_chat_template(mistral) == expected


def test_shipped_template_that_agrees(checkpoint, mistral):
    assert template_disagreement((checkpoint(HF) / "chat_template.jinja").read_text(encoding="utf-8"), mistral) \
        is None


TAMPERED = {
    # what changes → the probe that must catch it
    "system": (("[SYSTEM_PROMPT]", "[INST]"), "system + user"),
    "tools": (("[AVAILABLE_TOOLS]", "[TOOL_RESULTS]"), "tools"),
    "effort": (("~ reasoning_effort ~", "~ 'none' ~"), "reasoning_effort high"),  # the setting ignored
    "thinking": (("'[THINK]' ~ block['thinking']", "'[THINK] ' ~ block['thinking']"), "reasoning_effort high"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_template_disagrees(checkpoint, mistral, case):
    (old, new), probe = TAMPERED[case]
    template = (checkpoint(HF) / "chat_template.jinja").read_text(encoding="utf-8")
    assert old in template
    reason = template_disagreement(template.replace(old, new), mistral)
    assert reason is not None and f"probe '{probe}'" in reason, reason


def test_broken_template_disagrees(mistral):
    assert "does not parse" in template_disagreement("{% if %}", mistral)
    assert "fails to render" in template_disagreement("{{ raise_exception('no tools here') }}", mistral)


def test_convert_keeps_an_agreeing_template_and_replaces_a_tampered_one(hf_copy, tmp_path):
    shipped = (hf_copy / "chat_template.jinja").read_text(encoding="utf-8")
    good = run_cli("convert", hf_copy, "-o", tmp_path / "good.gguf", "--no-mmproj")
    assert good.returncode == 0 and "disagrees" not in good.stderr, good.stderr
    assert template_of(tmp_path / "good.gguf") == shipped

    tampered = shipped.replace("[SYSTEM_PROMPT]", "[INST]")
    (hf_copy / "chat_template.jinja").write_text(tampered, encoding="utf-8")
    result = run_cli("convert", hf_copy, "-o", tmp_path / "bad.gguf", "--no-mmproj")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    notes = [line for line in result.stderr.splitlines() if "disagrees" in line]
    assert notes == ["the checkpoint's chat_template.jinja disagrees with mistral-common's v15 format (probe "
                     "'system + user': token ids differ from position 1): the GGUF gets mistral-common's chat "
                     "template instead"], result.stderr
    # The fixture ships mistral-common's own template, so the replacement is the untampered text.
    assert template_of(tmp_path / "bad.gguf") == shipped


def test_tampered_template_in_tokenizer_config_replaced(hf_copy, tmp_path):
    """No chat_template.jinja, the template in tokenizer_config.json instead: checked the same way."""
    shipped = (hf_copy / "chat_template.jinja").read_text(encoding="utf-8")
    (hf_copy / "chat_template.jinja").unlink()
    edit_json(hf_copy / "tokenizer_config.json", lambda c: c.update(chat_template=shipped.replace("[/INST]", "[INST]")))
    result = run_cli("convert", hf_copy, "-o", tmp_path / "out.gguf", "--no-mmproj")
    assert result.returncode == 0, result.stderr
    assert "tokenizer_config.json chat_template disagrees with mistral-common's v15 format" in result.stderr
    assert template_of(tmp_path / "out.gguf") == shipped


# --- 3. no tokenizer at all -------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [HF, NATIVE], ids=["hf", "native"])
def test_no_tokenizer_files(checkpoint, tmp_path, spec):
    """Once reported as a missing [IMG_BREAK] id; now says what is missing and what to do."""
    directory = copy_checkpoint(checkpoint(spec), tmp_path / "ckpt")
    for name in ("tekken.json", "tokenizer.json"):
        (directory / name).unlink(missing_ok=True)
    result = run_cli("convert", directory, "-o", tmp_path / "out.gguf")
    assert_one_line_error(result, f"no tokenizer found in {directory} (neither tekken.json nor tokenizer.json)",
                          "copy the release's tekken.json")
    assert "IMG_BREAK" not in result.stderr
    assert leftovers(tmp_path) == ["ckpt"]


def test_tokenizer_json_without_tekken(hf_copy, tmp_path):
    (hf_copy / "tekken.json").unlink()
    assert_one_line_error(run_cli("convert", hf_copy, "-o", tmp_path / "out.gguf"), "has no tekken.json")
    assert leftovers(tmp_path) == ["ckpt"]


# --- 4. the second rename fails after the first landed ----------------------------------------------


@pytest.fixture
def failing_second_rename(monkeypatch):
    """os.replace fails for the projector's temporary file only (the model's rename, and restores, work)."""
    def replace(source, target, *args, **kwargs):
        if str(source).endswith(".partial") and Path(target).name.endswith("-mmproj.gguf"):
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


def test_failed_second_rename_removes_the_first(checkpoint, tmp_path, failing_second_rename):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    with pytest.raises(ConversionError, match=r"cannot write .*m-mmproj\.gguf: Input/output error"):
        convert_checkpoint(checkpoint(HF), out, "f32")
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("links", [True, False], ids=["hard-link", "no-hard-links"])
def test_failed_second_rename_restores_what_force_replaced(checkpoint, tmp_path, failing_second_rename, monkeypatch,
                                                          links):
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    out.write_bytes(b"previous model")
    out.with_name("m-mmproj.gguf").write_bytes(b"previous projector")
    if not links:  # a file system without hard links: the previous file is renamed aside instead
        def no_link(*args, **kwargs):
            raise OSError(errno.EPERM, "Operation not permitted")
        monkeypatch.setattr(os, "link", no_link)
    with pytest.raises(ConversionError, match="cannot write"):
        convert_checkpoint(checkpoint(HF), out, "f32", force=True)
    assert out.read_bytes() == b"previous model"
    assert out.with_name("m-mmproj.gguf").read_bytes() == b"previous projector"
    assert leftovers(out.parent) == ["m-mmproj.gguf", "m.gguf"]
    # Once the renames work, --force replaces both and keeps nothing of the previous files.
    monkeypatch.setattr(os, "replace", real_replace)
    convert_checkpoint(checkpoint(HF), out, "f32", force=True)
    assert read_header(out).architecture == "mistral4" and read_header(out.with_name("m-mmproj.gguf")).tensors
    assert leftovers(out.parent) == ["m-mmproj.gguf", "m.gguf"]
