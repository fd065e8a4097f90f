//! One error type for the whole library: an errno for programs and a sentence for people.

/// A failure: the errno that best classifies it and a message that says what and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    errno: i32,
    message: String,
}

impl Error {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Error { errno, message: message.into() }
    }

    /// A failed system call: `context` says what was attempted, the OS text says why.
    pub fn os(errno: i32, context: impl std::fmt::Display) -> Self {
        let why = std::io::Error::from_raw_os_error(errno);
        Error::new(errno, format!("{context}: {why}"))
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::new(libc::EINVAL, message)
    }

    /// The positive errno value (`EINVAL`, `ENOENT`, ...).
    pub fn errno(&self) -> i32 {
        self.errno
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
