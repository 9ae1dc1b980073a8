"""Build hook: compile the KVM guest reader into the package (docs/kvm.md, "The build").

Runs for wheels and editable installs.  Where gcc or Debian's static zlib/zstd archives
are missing, the install still succeeds with a warning, and
``aiodd.guest.kvm.availability()`` reports why the KVM mode is unavailable.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from hatchling.builders.config import BuilderConfig
from hatchling.builders.hooks.plugin.interface import BuildHookInterface

GUEST = "aiodd/guest/kvm/guest.elf"


def _load_builder(root: Path) -> ModuleType:
    # By path: aiodd's dependencies are not installed in the build environment.
    path = root / "aiodd" / "guest" / "kvm" / "build.py"
    spec = importlib.util.spec_from_file_location("_aiodd_kvm_build", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and the like look themselves up here
    spec.loader.exec_module(module)
    return module


class GuestBuildHook(BuildHookInterface[BuilderConfig]):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        root = Path(self.root)
        builder = _load_builder(root)
        output = root / GUEST
        try:
            builder.build(output)
        except builder.BuildError as exc:
            output.unlink(missing_ok=True)  # never ship a guest older than its sources
            self.app.display_warning(
                f"aiodd: the KVM guest reader was not built, its mode will be unavailable: {exc}"
            )
            return
        # Ignored by git, so named here for the wheel to include it.
        build_data["artifacts"].append(f"/{GUEST}")
