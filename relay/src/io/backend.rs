//! Which backend the workers run: `auto` resolved against what the kernel allows.

use super::{uring, BackendChoice, StartError, UringUnavailable};

/// The backend workers actually run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Chosen {
    Uring,
    Portable,
}

impl Chosen {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Chosen::Uring => "uring",
            Chosen::Portable => "portable",
        }
    }
}

/// Resolves `auto`: io_uring when this process can set it up, otherwise the portable
/// backend with one log line saying why; that reason is returned with the choice.
pub(crate) fn choose_backend(
    choice: BackendChoice,
) -> Result<(Chosen, Option<UringUnavailable>), StartError> {
    match choice {
        BackendChoice::Portable => Ok((Chosen::Portable, None)),
        BackendChoice::Uring => {
            uring::probe()?;
            Ok((Chosen::Uring, None))
        }
        BackendChoice::Auto => match uring::probe() {
            Ok(()) => Ok((Chosen::Uring, None)),
            Err(e) => {
                tracing::warn!("{e}; falling back to the portable backend (epoll + recvmmsg)");
                Ok((Chosen::Portable, Some(e)))
            }
        },
    }
}
