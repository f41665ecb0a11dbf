//! `kvh demo` (placeholder).
