"""Input formats → raw.  qcow2, compressed qcow2, vmdk streamOptimized, vhdx, vdi,
parallels, qcow (version 1) and qed, all made by qemu-img from the same compressible raw
file, and a raw with 4 KiB holes made by qemu-img from that file with a quarter of its
4 KiB blocks zeroed, copied back to raw."""

from __future__ import annotations

from bench.context import Bench
from bench.data import IMAGE_KINDS
from bench.measure import Case, MiB, Result, find, human
from bench.modes import kvm_skipped, modes
from bench.report import Floor, Section, Table, ratio_floor

NAME = "inputs"
GROUP = "input formats"  # the first column of the floor tables


def run(b: Bench) -> Section:
    size = b.sizes.main
    sec = Section(NAME, "Input formats → raw")
    ms = modes(b)
    raw = b.data.mixed_raw(size)
    images = {kind.key: b.data.image(kind, size) for kind in IMAGE_KINDS}

    rows = [
        "| input | made with | virtual size | file size | file / raw allocated |",
        "|---|---|---|---|---|",
    ]
    raw_alloc = raw.stat().st_blocks * 512
    rows.append(
        f"| {raw.name} | the mix above | {human(size)} "
        f"| {raw_alloc / MiB:.0f} MiB allocated | 100% |"
    )
    for kind in IMAGE_KINDS:
        st = images[kind.key].stat()
        made = " ".join(("qemu-img convert -O", kind.fmt, *kind.options))
        held, unit = st.st_size, "MiB"
        if kind.source != "mixed":  # a raw image: what it holds is what is allocated
            made += f"` of `{b.data.source(kind, size).name}"
            held, unit = st.st_blocks * 512, "MiB allocated"
        rows.append(
            f"| {images[kind.key].name} | `{made}` | {human(size)} | "
            f"{held / MiB:.0f} {unit} | {100 * held / raw_alloc:.0f}% |"
        )
    sec.preamble.append(
        "The raw source is 64 KiB chunks chosen at random (fixed seed): 30% random bytes, "
        "40% text-like lines, 20% table-like records, 10% zeros.  qemu-img leaves its zero "
        "clusters unallocated in every image.  The raw with holes is made from the same mix "
        "with a quarter of its 4 KiB blocks zeroed at random (fixed seed): qemu-img convert "
        "-O raw leaves a hole for each run of zero blocks, as it does converting a used "
        "disk.\n\n" + "\n".join(rows)
    )
    if skipped := kvm_skipped(b):
        sec.preamble.append(skipped)

    out = b.out("inputs.raw")
    cases: list[Case] = []
    for kind in IMAGE_KINDS:
        src = images[kind.key]
        label = f"{kind.label} → raw"
        for mode in ms:
            cases.append(
                Case(
                    Result(NAME, "main", f"aiodd ({mode})", f"{label}, bs=1M", size),
                    (b.aiodd(src, out, bs="1M", isolation=mode, fmt_in=kind.fmt),),
                    (out,),
                    check=b.same_bytes(b.data.source(kind, size), out, size),
                )
            )
        cases += [
            Case(
                Result(NAME, "main", "qemu-img dd", f"{label}, bs=1M", size),
                (b.qemu_dd(src, out, bs="1M", fmt_in=kind.fmt),),
                (out,),
            ),
            Case(
                Result(NAME, "main", "qemu-img convert", label, size),
                (b.qemu_convert(src, out, fmt_in=kind.fmt),),
                (out,),
            ),
            Case(
                Result(NAME, "main", "qemu-img convert + sync", label, size),
                (b.qemu_convert(src, out, fmt_in=kind.fmt), b.sync(out)),
                (out,),
            ),
        ]
    b.log(f"[inputs] {human(size)} images → raw")
    results = b.run(cases)
    sec.tables.append(
        Table(
            f"{human(size)} images → raw",
            results,
            "cores: CPU seconds / wall seconds (aiodd's includes its guest's).  qemu-img "
            "convert writes holes where the input has none allocated; aiodd writes every "
            "byte (docs/window.md#the-rules: the copy is dense).",
            extra=[("cores", lambda r: f"{r.cpu / r.median:.2f}")],
        )
    )

    floors: list[Floor] = []
    for kind in IMAGE_KINDS:
        label = f"{kind.label} → raw"
        convert = find(results, "qemu-img convert", label)
        convert_sync = find(results, "qemu-img convert + sync", label)
        limit = 1.5 if kind.compressed else 1.0
        qemu_dd = find(results, "qemu-img dd", f"{label}, bs=1M")
        for mode in ms:
            ours = find(results, f"aiodd ({mode})", f"{label}, bs=1M")
            floors += [
                # Durable against the page cache: shown, not a floor (the cache
                # section compares -t unsafe with plain convert).
                ratio_floor(
                    GROUP,
                    f"aiodd ({mode}) {label} durable vs page cache: plain qemu-img convert",
                    ours,
                    convert,
                    limit,
                    informative=True,
                ),
                # Durable against durable: the tool aiodd replaces, and convert + sync.
                ratio_floor(GROUP, f"aiodd ({mode}) {label} ≤ qemu-img dd", ours, qemu_dd, 1.0),
                ratio_floor(
                    GROUP,
                    f"aiodd ({mode}) {label} ≤ qemu-img convert + sync (durable vs durable)",
                    ours,
                    convert_sync,
                    1.0,
                ),
            ]
    sec.floors = floors
    return sec
