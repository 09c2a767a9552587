pub mod address;
pub mod config;
pub mod smtp;
