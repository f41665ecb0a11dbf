//! Pool statistics (placeholder).
