//! The cleaning pipeline (being written).
