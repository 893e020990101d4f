"""The shapes of the names every service accepts: one definition, so they never drift apart.

Each comes as a pattern, a body field type and a path parameter type.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import Field

# A project is a DNS label, like the Kubernetes namespace it may become.
PROJECT_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# Catalog assets, model routes: "ibm-granite/granite-3.1-8b", "io.github.user/server".
ASSET_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$"
# OIDC subjects and local user names: no white space, slash or control character.
SUBJECT_PATTERN = r"^[^\s/\x00-\x1f\x7f]{1,255}$"
KEY_ID_PATTERN = r"^[0-9A-Za-z]{8}$"
# An MCP tool's name.
TOOL_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,127}$"
UUID_PATTERN = r"^[0-9a-f-]{36}$"

ProjectName = Annotated[
    str,
    Field(
        pattern=PROJECT_PATTERN,
        description="A DNS label, like a Kubernetes namespace",
        examples=["fraud-detection"],
    ),
]
AssetName = Annotated[str, Field(pattern=ASSET_PATTERN)]
ToolName = Annotated[str, Field(pattern=TOOL_PATTERN)]
Subject = Annotated[
    str,
    Field(
        pattern=SUBJECT_PATTERN,
        description="An OIDC subject or a local user name",
        examples=["alice"],
    ),
]
KeyId = Annotated[str, Field(pattern=KEY_ID_PATTERN, description="An API key id")]

ProjectPath = Annotated[str, Path(pattern=PROJECT_PATTERN)]
AssetPath = Annotated[str, Path(pattern=ASSET_PATTERN)]
SubjectPath = Annotated[str, Path(pattern=SUBJECT_PATTERN)]
KeyIdPath = Annotated[str, Path(pattern=KEY_ID_PATTERN)]
UUIDPath = Annotated[str, Path(pattern=UUID_PATTERN)]
