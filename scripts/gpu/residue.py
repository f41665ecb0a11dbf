"""Residue demo: does torch.empty() after a free show the previous owner's data?

With PyTorch's default caching allocator it does (the threat); under kvhygiene it must read
zeros. --threads runs the writer and the reader on two threads under two tenant contexts.

Under kvhygiene the reader of another tenant never gets the writer's block (strict isolation),
so zeros there could come from a block never used. So kvhygiene also runs the same tenant
again: free, wait for the scrub, ask for the same size: the pool hands back the very block
that held the secret (`reused_block`), and only the scrub can have zeroed it.
"""

import sys
import threading

from common import parse, setup, write

SECRET = 1234.5
ELEMENTS = 8 << 20  # 32 MiB of float32


def write_secret(torch):
    x = torch.full((ELEMENTS,), SECRET, device="cuda")
    torch.cuda.synchronize()
    del x


def read_back(torch) -> dict:
    y = torch.empty((ELEMENTS,), device="cuda")
    seen = int((y == SECRET).sum().item())
    nonzero = int((y != 0).sum().item())
    del y
    return {"secret_seen": seen, "nonzero": nonzero}


def reuse_after_scrub(torch) -> dict:
    """kvhygiene, one tenant: the freed block, once scrubbed, handed back to the same size."""
    import kvhygiene

    x = torch.full((ELEMENTS,), SECRET, device="cuda")
    torch.cuda.synchronize()
    held = x.data_ptr()
    del x
    # The free queued the block's scrub; the pool reuses it only once it is CLEAN.
    kvhygiene.synchronize()
    y = torch.empty((ELEMENTS,), device="cuda")
    found = {
        "reused_block": y.data_ptr() == held,
        "reused_secret_seen": int((y == SECRET).sum().item()),
        "reused_nonzero": int((y != 0).sum().item()),
    }
    del y
    return found


def tenant(mode, tenant_id, request_id):
    if mode != "kvh":
        import contextlib

        return contextlib.nullcontext()
    import kvhygiene

    return kvhygiene.context(tenant_id=tenant_id, request_id=request_id, model_id="residue")


def main():
    args = parse(__doc__)
    torch = setup(args.mode)
    result = {}
    if args.threads:
        written = threading.Event()
        errors = []

        def writer():
            try:
                with tenant(args.mode, "tenant-a", "req-a"):
                    write_secret(torch)
            except BaseException as e:  # noqa: BLE001 - reported below, the step fails
                errors.append(("writer", e))
            finally:
                # Also after a failure: the reader must not wait for a secret never written.
                written.set()

        def reader():
            written.wait()
            if errors:
                return
            try:
                with tenant(args.mode, "tenant-b", "req-b"):
                    result.update(read_back(torch))
            except BaseException as e:  # noqa: BLE001 - reported below, the step fails
                errors.append(("reader", e))

        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            # A thread's exception does not end the process with an error by itself: the step
            # must fail, not write a result without its figures.
            for who, e in errors:
                print(f"residue: the {who} thread failed: {e!r}", file=sys.stderr)
            sys.exit(1)
    else:
        with tenant(args.mode, "tenant-a", "req-a"):
            write_secret(torch)
        with tenant(args.mode, "tenant-b", "req-b"):
            result.update(read_back(torch))
        if args.mode == "kvh":
            with tenant(args.mode, "tenant-a", "req-c"):
                result.update(reuse_after_scrub(torch))
    write(
        args.out,
        {
            "step": "residue_threads" if args.threads else "residue",
            "mode": args.mode,
            "elements": ELEMENTS,
            **result,
        },
    )


if __name__ == "__main__":
    main()
