//! Tsubame's userfaultfd fault engine (issue: postcopy migration; not built yet).
//!
//! Planned shape (see the README's layout and the team's design notes): register guest RAM in
//! missing mode (not user-mode-only: KVM faults in kernel mode), read fault events, keep a
//! page-state bitmap (missing / requested / present) that deduplicates requests, and resolve
//! faults with `UFFDIO_COPY` (contiguous runs in one call), `UFFDIO_ZEROPAGE` and wake on
//! `EEXIST`, asking a `PageSource`. It knows nothing of KVM or sockets. The ioctls are wrapped
//! here with nix (the `userfaultfd` crate's bindgen build needs libclang, and it turns `EAGAIN`
//! into a bogus partial copy).
