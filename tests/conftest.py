# SPDX-License-Identifier: Apache-2.0
"""Shared test plumbing. Tests that need root, BPF or namespaces skip only outside CI:
under CI=true a missing prerequisite fails the run instead of hiding a tier."""
from __future__ import annotations

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def require(condition: bool, why: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI=true: {why}")
    pytest.skip(why)


@pytest.fixture(scope="session")
def root():
    require(os.geteuid() == 0, "needs root")


@pytest.fixture(scope="session")
def bpf_object(root):
    """The compiled data plane (built once per session)."""
    require(shutil.which(os.environ.get("CLANG", "clang")) is not None, "needs clang")
    from xdplb import build
    report = build.compile_object()
    return report.path
