"""Prints the environment a bug report needs (like ds_report): versions, native ops built/compatible, apex.

    python tools/report_env.py
"""
import importlib.util
import os
import platform
import sys

from moe.ops.op_builder import AsyncIOBuilder

GREEN, RED, YELLOW, END = ("\033[92m", "\033[91m", "\033[93m", "\033[0m") if sys.stdout.isatty() else ("",) * 4
YES, NO = f"{GREEN}[YES]{END}", f"{YELLOW}[NO]{END}"
OKAY, FAIL = f"{GREEN}[OKAY]{END}", f"{RED}[FAIL]{END}"


def dots(name, width=28):
    return name + " " + "." * max(2, width - len(name)) + " "


def op_report():
    print("-" * 60)
    print("Native ops (csrc/): 'built' = prebuilt module importable, 'compatible' = buildable/usable here")
    print("-" * 60)
    print(f"{dots('op name')}built .. compatible")
    for builder in (AsyncIOBuilder(),):
        built = builder.prebuilt_available()
        compatible = builder.is_compatible()
        print(f"{dots(builder.NAME)}{YES if built else NO} .. {OKAY if compatible else FAIL}")
        if isinstance(builder, AsyncIOBuilder):
            header, library = builder.libaio_header(), builder.libaio_library()
            print(f"  {dots('libaio header', 26)}{header or 'not found (apt-get install libaio-dev)'}")
            print(f"  {dots('libaio library', 26)}{library or 'not found (apt-get install libaio1)'}")
            if not compatible:
                print(f"  reason: {builder.incompatible_reason()}")
            if built:
                try:
                    builder.load(allow_jit=False)
                    print(f"  {dots('load()', 26)}{OKAY}")
                except Exception as err:  # noqa: BLE001 - reported, not raised
                    print(f"  {dots('load()', 26)}{FAIL} {err}")


def env_report():
    import torch

    print("-" * 60)
    print("General environment")
    print("-" * 60)
    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} ({os.path.dirname(torch.__file__)})"),
        ("torch cuda", torch.version.cuda or "none (CPU build)"),
        ("cuda available", str(torch.cuda.is_available())),
        ("gpus", ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none"),
        ("nccl", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a"),
        ("apex", "installed" if importlib.util.find_spec("apex") else "not installed"),
        ("numpy", _version("numpy")),
        ("megatron-moe", _version("megatron-moe")),
    ]
    for name, value in rows:
        print(f"{dots(name)}{value}")


def _version(dist):
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001 - absent distribution
        return "not installed"


def main():
    op_report()
    env_report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
