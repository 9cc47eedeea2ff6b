//! Tsubame's wire protocol, page server and memserver (issue: postcopy migration; not built yet).
//!
//! Planned shape: framed binary messages over TCP (fixed little-endian header, version and
//! memory layout checked in the first message, bounded lengths, shared-secret challenge-response
//! before any memory moves), an urgent channel for demand requests and bulk channels for the
//! background push, and the source-side page server that serves a frozen VM's memory.
