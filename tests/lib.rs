//! # mcim-e2e
//!
//! End-to-end tests: each starts the real binaries (`mcimctl`, later `tred` and
//! `mcim-roles`) and, for flow tests, its own swtpm or SoftHSM2 instance with a fresh state
//! directory. The helpers that start those live here; the tests are in `tests/tests/`.
