//! The caching pool (placeholder; see ARCHITECTURE.md).
