//! Where a project's secrets come from: its `relay.toml` table, or Medplum. Looked up between
//! "which project" and the pure routing rules; the caches live inside the sources and outlive
//! a reload.

pub mod medplum;

use std::path::Path;
use std::sync::{Arc, LazyLock, RwLock};

use crate::config::{Config, Source};
use crate::project::{ProjectSecrets, ProjectSmtp, Secrets, SmtpTarget};
use crate::smtp::Reply;
use crate::tls::TlsError;
use medplum::Medplum;

/// What a source knows of one project.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Secrets),
    /// No such project there: its mail takes the server provider, as a project without
    /// `smtpHost` does.
    NotFound,
    /// It cannot be read, and this reply says why. Never the server provider instead.
    Unreadable(Reply),
}

/// A project's secrets for one message, and where to capture its mail.
pub struct Found<'c> {
    pub name: String,
    pub secrets: Secrets,
    pub capture: Option<&'c Path>,
}

/// The secret sources of a running relay, kept across reloads.
#[derive(Debug, Default)]
pub struct Sources {
    medplum: RwLock<Option<Arc<Medplum>>>,
}

/// A known project that holds no `smtpHost`.
static NO_SMTP: LazyLock<Secrets> = LazyLock::new(|| {
    Arc::new(ProjectSecrets {
        app_name: None,
        smtp: ProjectSmtp::None,
    })
});

impl Sources {
    pub fn new(config: &Config) -> Result<Sources, TlsError> {
        let sources = Sources::default();
        sources.configure(config)?;
        Ok(sources)
    }

    /// Takes the `[medplum]` table of a new config generation. An unchanged table keeps the
    /// tokens and the secret cache.
    pub fn configure(&self, config: &Config) -> Result<(), TlsError> {
        let mut current = self.medplum.write().unwrap_or_else(|e| e.into_inner());
        let unchanged = match (&*current, &config.medplum) {
            (Some(m), Some(settings)) => m.settings() == settings,
            (None, None) => true,
            _ => false,
        };
        if !unchanged {
            *current = match &config.medplum {
                Some(settings) => Some(Arc::new(Medplum::new(settings.clone())?)),
                None => None,
            };
        }
        Ok(())
    }

    fn medplum(&self) -> Option<Arc<Medplum>> {
        self.medplum
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The secrets of project `id` under `config`: `Ok(None)` for a project no source knows
    /// (the server provider), `Err` for one that cannot be read now.
    pub async fn find<'c>(&self, config: &'c Config, id: &str) -> Result<Option<Found<'c>>, Reply> {
        let found = |secrets: Secrets, capture: Option<&'c Path>| Found {
            name: id.to_owned(),
            secrets,
            capture,
        };
        let fleet = config.medplum.as_ref().and_then(|m| m.fleet.as_ref());
        let (client, capture) = match config.projects.get(id) {
            Some(p) => match &p.source {
                Source::File(secrets) => {
                    return Ok(Some(found(secrets.clone(), p.capture_dir.as_deref())));
                }
                Source::Medplum(client) => (client.as_ref(), p.capture_dir.as_deref()),
            },
            None if fleet.is_some() => (None, None),
            None => return Ok(None),
        };
        let per_project = client.is_some();
        let (Some(medplum), Some(client)) = (self.medplum(), client.or(fleet)) else {
            return Err(Reply::secrets_unavailable(id));
        };
        match medplum.lookup(id, client, per_project).await {
            Lookup::Found(secrets) => Ok(Some(found(secrets, capture))),
            // A project the file names stays that project (its captureDir, its name in logs).
            Lookup::NotFound if config.projects.contains_key(id) => {
                Ok(Some(found(NO_SMTP.clone(), capture)))
            }
            Lookup::NotFound => Ok(None),
            Lookup::Unreadable(reply) => Err(reply),
        }
    }

    /// `check`: whether the fleet credential gets a token (`None`: there is none).
    pub async fn check_fleet(&self) -> Option<Result<(), String>> {
        let medplum = self.medplum()?;
        let fleet = medplum.settings().fleet.clone()?;
        Some(medplum.check_client(&fleet).await)
    }

    /// The upstreams that Medplum projects send through now: their pools stay open.
    pub fn targets(&self) -> Vec<SmtpTarget> {
        self.medplum().map(|m| m.targets()).unwrap_or_default()
    }
}
