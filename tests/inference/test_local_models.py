"""A local model file as the catalog names it: ``file://`` or ``pkg://`` (a file an installed
package carries) becomes the path the engine loads, never a path outside that package; and a
version whose serving runtime is llama.cpp runs on the llama-cpp profile."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers

from services.inference.config import InferenceConfig
from services.inference.runtimes.base import EndpointSpec, RuntimeFailure
from services.inference.runtimes.local import _model_arg


def _spec(source_uri: str | None) -> EndpointSpec:
    return EndpointSpec(
        endpoint_id="e1",
        project="p",
        runtime_name="local",
        asset_name="acme/m",
        version="1",
        source_uri=source_uri,
        served_model_name="m",
        replicas=1,
        gpus=0,
        gpu_type=None,
        profile="llama-cpp",
        owner="o",
        request_id=None,
    )


def test_local_artifacts_resolve_to_files_on_this_host(tmp_path: Path) -> None:
    carried = Path(tokenizers.__file__).resolve()  # any installed package's file will do
    assert _model_arg(_spec("pkg://tokenizers/__init__.py")) == str(carried)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert _model_arg(_spec(gguf.as_uri())) == str(gguf)
    assert _model_arg(_spec("hf://acme/m")) == "acme/m"  # vLLM's own way
    assert _model_arg(_spec(None)) == "acme/m"


@pytest.mark.parametrize(
    "uri",
    [
        "pkg://tokenizers/../../../etc/passwd",  # out of the package
        "pkg://no_such_package/model.gguf",
        "file:///nowhere/model.gguf",
        "pkg://tokenizers/",  # a folder, not a file
    ],
)
def test_an_artifact_that_is_not_a_file_here_fails_the_start_with_a_reason(uri: str) -> None:
    with pytest.raises(RuntimeFailure, match="artifact"):
        _model_arg(_spec(uri))


def test_a_llama_cpp_version_gets_the_llama_cpp_profile() -> None:
    config = InferenceConfig()
    assert config.profile_for("llama.cpp") == "llama-cpp"
    assert config.profile_for("vllm") == "simulator"  # the default, unless mapped
    assert config.profile_for(None) == "simulator"
    assert config.profile_for("llama.cpp", "simulator") == "simulator"  # asked for wins
    unmapped = InferenceConfig(local_runtime_profiles={"llama.cpp": "missing"})
    assert unmapped.profile_for("llama.cpp") == "simulator"
