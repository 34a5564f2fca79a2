"""Write the shipped LoRA module lists, ``lora/modules_{base,refiner}.tsv``: ``names.rule_modules`` spelled out.

    python -m sdxl_ckpt.lora.index_file [--check]

``names.module_index`` reads these files instead of enumerating the rule tables' languages on every LoRA command
(the format: ``names.module_list_path``). ``--check`` exits 1 when a shipped file differs from a fresh
generation; the tests compare them too.
"""

from __future__ import annotations

import sys

from sdxl_ckpt.generated_files import write_or_check
from sdxl_ckpt.lora.names import MODULE_LIST_FIELDS, STRUCTURES, module_list_path, rule_modules


def render(structure: str) -> str:
    """The file's text for ``structure``: the header line, then one line per module in rule order."""
    lines = ["\t".join(MODULE_LIST_FIELDS)]
    for module in rule_modules(structure):
        part = "" if module.part is None else str(module.part)
        lines.append("\t".join((module.component, module.module, module.sd_key, module.transform, part)))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    files = {module_list_path(s): (lambda s=s: render(s)) for s in STRUCTURES}
    return write_or_check(files, sys.argv[1:] if argv is None else argv, "python -m sdxl_ckpt.lora.index_file")


if __name__ == "__main__":
    sys.exit(main())
