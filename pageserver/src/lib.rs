//! Tsubame's wire protocol and page server.
//!
//! [`protocol`]: framed binary messages, versioning, and mutual HMAC challenge-response; see its
//! module docs for the sequence of a migration. The page server and memserver build on it.

pub mod protocol;
