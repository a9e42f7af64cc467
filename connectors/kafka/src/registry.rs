//! The Confluent-compatible schema registry: registering a table's schemas, checking a new
//! version against the subject's compatibility rule first, and reading schemas back by id.
//!
//! ```text
//!   prepare(table) ──► registered under the subject already? ──yes──► its id
//!                          │ no
//!                          ▼
//!                      compatible with the subject's rule? ──no──► SchemaIncompatible (stop)
//!                          │ yes                                  or, opt-in, a forced version
//!                          ▼
//!                      register ──► new id
//! ```

use crate::security::{RegistryAccess, RegistryAuth};
use crate::{decode, SinkError};
use schema_registry_converter::async_impl::schema_registry::{post_schema, SrSettings};
use schema_registry_converter::schema_registry_common::{SchemaType, SuppliedSchema};
use std::time::Duration;

/// A Confluent-compatible schema registry.
#[derive(Clone)]
pub struct Registry {
    settings: SrSettings,
    url: String,
    access: RegistryAccess,
    timeout: Duration,
    /// For the requests the registry client has no call for (lookup, compatibility, config).
    http: reqwest::Client,
}

impl Registry {
    /// A registry without login or TLS settings.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, SinkError> {
        Self::with_access(url, &RegistryAccess::default(), timeout)
    }

    pub fn with_access(
        url: &str,
        access: &RegistryAccess,
        timeout: Duration,
    ) -> Result<Self, SinkError> {
        let mut builder = SrSettings::new_builder(url.to_string());
        builder.set_timeout(timeout).no_proxy();
        match &access.auth {
            RegistryAuth::None => {}
            RegistryAuth::Basic { username, password } => {
                builder.set_basic_authorization(username, Some(password));
            }
            RegistryAuth::Bearer(token) => {
                builder.set_token_authorization(token);
            }
        }
        let client = access
            .client_builder()
            .map_err(|e| SinkError::Config(e.to_string()))?;
        let http = access
            .client_builder()
            .map_err(|e| SinkError::Config(e.to_string()))?
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| SinkError::Config(format!("schema registry {url}: {e}")))?;
        let settings = builder
            .build_with(client)
            .map_err(|e| SinkError::Config(format!("schema registry {url}: {e}")))?;
        Ok(Self {
            settings,
            url: url.to_string(),
            access: access.clone(),
            timeout,
            http,
        })
    }

    /// `req` with the configured login.
    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.access.auth {
            RegistryAuth::None => req,
            RegistryAuth::Basic { username, password } => req.basic_auth(username, Some(password)),
            RegistryAuth::Bearer(token) => req.bearer_auth(token),
        }
    }

    /// One request to the Confluent API: `Ok((status, body))` for any HTTP answer, `Err` when
    /// the registry does not answer.
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), SinkError> {
        let url = format!("{}/{path}", self.url.trim_end_matches('/'));
        let mut req = self.authorized(
            self.http
                .request(method, &url)
                .header("Accept", "application/vnd.schemaregistry.v1+json"),
        );
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/vnd.schemaregistry.v1+json")
                .body(b.to_string());
        }
        let unreachable = |detail: String| SinkError::RegistryUnreachable {
            url: self.url.clone(),
            detail,
        };
        let resp = req.send().await.map_err(|e| unreachable(e.to_string()))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| unreachable(e.to_string()))?;
        if status >= 500 || status == 401 || status == 403 {
            return Err(unreachable(format!("{url}: HTTP {status}: {text}")));
        }
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        ))
    }

    /// The id of `schema` when it is registered under `subject` already (at any version).
    pub async fn lookup(&self, subject: &str, schema: &str) -> Result<Option<u32>, SinkError> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("subjects/{subject}"),
                Some(serde_json::json!({ "schema": schema })),
            )
            .await?;
        match (status, body["id"].as_u64()) {
            (200, Some(id)) => Ok(u32::try_from(id).ok()),
            _ => Ok(None),
        }
    }

    /// Whether `schema` passes `subject`'s compatibility rule against its latest version (a
    /// subject without versions accepts anything).
    pub async fn is_compatible(&self, subject: &str, schema: &str) -> Result<bool, SinkError> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                &format!("compatibility/subjects/{subject}/versions/latest"),
                Some(serde_json::json!({ "schema": schema })),
            )
            .await?;
        match status {
            200 => Ok(body["is_compatible"].as_bool().unwrap_or(false)),
            404 => Ok(true),
            _ => Err(SinkError::SchemaRejected {
                subject: subject.to_string(),
                detail: format!("compatibility check answered HTTP {status}: {body}"),
            }),
        }
    }

    /// The text of `subject`'s latest version, if it has one.
    pub async fn latest(&self, subject: &str) -> Result<Option<String>, SinkError> {
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("subjects/{subject}/versions/latest"),
                None,
            )
            .await?;
        Ok(match status {
            200 => body["schema"].as_str().map(str::to_string),
            _ => None,
        })
    }

    /// The compatibility rule that applies to `subject` (its own, else the registry's).
    pub async fn compatibility(&self, subject: &str) -> Result<Option<String>, SinkError> {
        let level = |b: &serde_json::Value| {
            b["compatibilityLevel"]
                .as_str()
                .or(b["compatibility"].as_str())
                .map(str::to_string)
        };
        let (status, body) = self
            .call(
                reqwest::Method::GET,
                &format!("config/{subject}?defaultToGlobal=true"),
                None,
            )
            .await?;
        if status == 200 {
            return Ok(level(&body));
        }
        let (status, body) = self.call(reqwest::Method::GET, "config", None).await?;
        Ok((status == 200).then(|| level(&body)).flatten())
    }

    async fn set_compatibility(
        &self,
        subject: &str,
        level: &str,
    ) -> Result<(u16, serde_json::Value), SinkError> {
        self.call(
            reqwest::Method::PUT,
            &format!("config/{subject}"),
            Some(serde_json::json!({ "compatibility": level })),
        )
        .await
    }

    /// Registers `schema` under `subject` although it breaks the subject's rule: the subject's
    /// rule is set to NONE for this one registration and then put back as it was.
    pub async fn register_forced(&self, subject: &str, schema: &str) -> Result<u32, SinkError> {
        let previous = self.compatibility(subject).await?;
        let (status, body) = self.set_compatibility(subject, "NONE").await?;
        if status != 200 {
            return Err(SinkError::SchemaRejected {
                subject: subject.to_string(),
                detail: format!("setting its compatibility to NONE answered HTTP {status}: {body}"),
            });
        }
        let registered = self.register(subject, schema).await;
        if let Some(level) = previous.filter(|l| l != "NONE") {
            // Put back even when the registration failed; a failure here is logged, since the
            // subject then accepts any change until someone sets its rule again.
            match self.set_compatibility(subject, &level).await {
                Ok((200, _)) => {}
                Ok((status, body)) => {
                    tracing::error!(subject, level, status, %body, "cannot put the subject's compatibility rule back")
                }
                Err(e) => tracing::error!(
                    subject,
                    level,
                    "cannot put the subject's compatibility rule back: {e}"
                ),
            }
        }
        registered
    }

    /// Why a request to the registry fails, in full: the registry client reports only "error
    /// sending request", so one plain request is made and its error chain (TLS, refused
    /// connection) or its HTTP status (401, 403) is read.
    async fn diagnose(&self) -> Option<String> {
        let client = self
            .access
            .client_builder()
            .ok()?
            .timeout(self.timeout)
            .no_proxy()
            .build()
            .ok()?;
        let req =
            self.authorized(client.get(format!("{}/subjects", self.url.trim_end_matches('/'))));
        match req.send().await {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!(
                "HTTP {}{}",
                r.status(),
                match r.status().as_u16() {
                    401 => " (check kafka.schema_registry's username and password, or token)",
                    403 => " (the registry user lacks permission)",
                    _ => "",
                }
            )),
            Err(e) => {
                let mut chain = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    chain.push_str(": ");
                    chain.push_str(&c.to_string());
                    cause = c.source();
                }
                if chain.contains("certificate verify failed") {
                    chain.push_str(" (check the CA file of the registry's TLS settings)");
                }
                Some(chain)
            }
        }
    }

    /// Registers `schema` under `subject` (or finds it registered) and returns its id.
    pub async fn register(&self, subject: &str, schema: &str) -> Result<u32, SinkError> {
        let supplied = SuppliedSchema::new(None, SchemaType::Avro, schema.to_string());
        match post_schema(&self.settings, subject.to_string(), supplied).await {
            Ok(r) => Ok(r.id),
            Err(e)
                if e.retriable
                    || e.error.contains("connect")
                    || e.cause.as_deref().is_some_and(|c| c.contains("connect")) =>
            {
                Err(SinkError::RegistryUnreachable {
                    url: self.url.clone(),
                    detail: registry_detail(&e),
                })
            }
            Err(e) => Err(SinkError::SchemaRejected {
                subject: subject.to_string(),
                detail: registry_detail(&e),
            }),
        }
    }

    /// Lists the subjects: proves the registry answers.
    pub async fn ping(&self) -> Result<usize, SinkError> {
        match schema_registry_converter::async_impl::schema_registry::get_all_subjects(
            &self.settings,
        )
        .await
        .map(|s| s.len())
        {
            Ok(n) => Ok(n),
            Err(e) => Err(SinkError::RegistryUnreachable {
                url: self.url.clone(),
                detail: self.diagnose().await.unwrap_or_else(|| registry_detail(&e)),
            }),
        }
    }

    /// The id and text of the newest value schema registered for `topic`.
    pub async fn latest_value_schema(
        &self,
        topic: &str,
    ) -> Result<(u32, String), decode::DecodeError> {
        use schema_registry_converter::schema_registry_common::SubjectNameStrategy;
        let subject = SubjectNameStrategy::TopicNameStrategy(topic.to_string(), false);
        match schema_registry_converter::async_impl::schema_registry::get_schema_by_subject(
            &self.settings,
            &subject,
        )
        .await
        {
            Ok(s) => Ok((s.id, s.schema)),
            Err(e)
                if e.error.contains("404")
                    || e.cause.as_deref().is_some_and(|c| c.contains("404")) =>
            {
                Err(decode::DecodeError::Unsupported {
                    id: 0,
                    why: format!(
                        "no value schema is registered for topic {topic}: {}",
                        registry_detail(&e)
                    ),
                })
            }
            Err(e) => Err(decode::DecodeError::RegistryUnreachable {
                url: self.url.clone(),
                detail: registry_detail(&e),
            }),
        }
    }

    /// The schema text registered under `id`.
    pub async fn schema_by_id(&self, id: u32) -> Result<String, decode::DecodeError> {
        match schema_registry_converter::async_impl::schema_registry::get_schema_by_id(
            id,
            &self.settings,
        )
        .await
        {
            Ok(s) => Ok(s.schema),
            Err(e)
                if e.error.contains("404")
                    || e.cause
                        .as_deref()
                        .is_some_and(|c| c.contains("404") || c.contains("40403")) =>
            {
                Err(decode::DecodeError::UnknownSchema {
                    id,
                    detail: registry_detail(&e),
                })
            }
            Err(e) => Err(decode::DecodeError::RegistryUnreachable {
                url: self.url.clone(),
                detail: registry_detail(&e),
            }),
        }
    }

    /// The registry's base URL, as configured.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn settings(&self) -> &SrSettings {
        &self.settings
    }
}

fn registry_detail(e: &schema_registry_converter::error::SRCError) -> String {
    match &e.cause {
        Some(c) => format!("{}: {c}", e.error),
        None => e.error.clone(),
    }
}
