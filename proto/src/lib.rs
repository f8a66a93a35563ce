//! generated code
