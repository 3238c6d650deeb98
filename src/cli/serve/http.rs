//! The OpenAI-style routes of `lora serve` (and vLLM's adapter loading), JSON errors, and the
//! text side of generation: detokenising, stop strings, server-sent events.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use lora::models::Sampling;
use lora::serve::{Event, Finish, SeqRequest};
use serde::Deserialize;
use serde_json::{json, Value};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::ReceiverStream;

use super::adapters::{AdapterError, Adapters};
use super::worker::{Job, Msg, Worker};

/// Everything the handlers share.
pub struct AppState {
    /// The base model's name (its folder's name).
    pub base_name: String,
    /// The base model's folder.
    pub base_path: PathBuf,
    /// The tokenizer.
    pub tok: Tokenizer,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Context length.
    pub ctx: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// The adapters.
    pub adapters: Adapters,
    /// The batch thread.
    pub worker: Worker,
    /// Request counter for ids and unseeded sampling.
    pub counter: AtomicU64,
}

type App = Arc<AppState>;

/// An error as OpenAI's API returns it: `{"error": {"message", "type", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            _ => "server_error",
        };
        let body = json!({"error": {"message": self.message, "type": kind,
                                    "code": self.status.as_u16()}});
        (self.status, Json(body)).into_response()
    }
}

/// The routes.
pub fn router(state: App) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn health(State(s): State<App>) -> Json<Value> {
    Json(
        json!({"status": "ok", "pending": s.worker.pending(), "loaded_adapters": s.adapters.loaded()}),
    )
}

async fn models(State(s): State<App>) -> Json<Value> {
    let t = now();
    let mut data = vec![json!({"id": s.base_name, "object": "model", "created": t,
        "owned_by": "lora", "root": s.base_path, "parent": null})];
    for (name, path) in s.adapters.list() {
        data.push(
            json!({"id": name, "object": "model", "created": t, "owned_by": "lora",
            "root": path, "parent": s.base_name}),
        );
    }
    Json(json!({"object": "list", "data": data}))
}

/// Parses a JSON body into `T`, or a 400 naming what is wrong.
fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// `prompt`: a string, a list of token ids, or a list of one string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields of `/v1/completions` this server reads; others are ignored, as OpenAI's
/// optional ones (`user`, `logit_bias`, ...) may be sent by clients.
#[derive(Debug, Deserialize)]
struct CompletionRequest {
    model: String,
    prompt: Prompt,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    n: Option<usize>,
}

/// What generation needs once the request is checked.
struct Prepared {
    id: String,
    model: String,
    req: SeqRequest,
    prompt_tokens: usize,
    stops: Vec<String>,
}

impl AppState {
    /// Checks a request and resolves its model: 400, 404 or 413 on failure.
    async fn prepare(&self, r: CompletionRequest, prompt: Vec<u32>) -> Result<Prepared, ApiError> {
        if r.n.is_some_and(|n| n != 1) {
            return Err(ApiError::bad("only n = 1 is supported"));
        }
        if prompt.is_empty() {
            return Err(ApiError::bad("the prompt is empty"));
        }
        if let Some(t) = prompt.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(ApiError::bad(format!(
                "token id {t} is outside the vocabulary (size {})",
                self.vocab
            )));
        }
        if prompt.len() >= self.ctx {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the prompt has {} tokens; the model's context holds {}",
                    prompt.len(),
                    self.ctx
                ),
            ));
        }
        let sampling = Sampling {
            temperature: r.temperature.unwrap_or(1.0),
            top_p: r.top_p.unwrap_or(1.0),
            seed: r.seed.unwrap_or_else(|| {
                now() ^ self.counter.fetch_add(1, Ordering::Relaxed).rotate_left(32)
            }),
        };
        lora::models::Sampler::new(sampling).map_err(|e| ApiError::bad(e.to_string()))?;
        let stops = match r.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let adapter = if r.model == self.base_name {
            None
        } else {
            match self.adapters.get(&r.model).await {
                Ok(a) => Some(a),
                Err(AdapterError::Unknown) => {
                    return Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!("the model `{}` does not exist", r.model),
                    ))
                }
                Err(AdapterError::Load(e)) => {
                    return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))
                }
            }
        };
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Ok(Prepared {
            id: format!("cmpl-{n}"),
            model: r.model,
            prompt_tokens: prompt.len(),
            req: SeqRequest {
                prompt,
                adapter,
                max_new_tokens: r.max_tokens.unwrap_or(16),
                sampling,
                stop: self.eos.clone(),
            },
            stops,
        })
    }

    /// Queues the sequence; 503 when the queue is full.
    fn submit(&self, req: SeqRequest) -> Result<UnboundedReceiver<Msg>, ApiError> {
        let (tx, rx) = unbounded_channel();
        self.worker.submit(Job { req, out: tx }).map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the request queue is full; retry later",
            )
        })?;
        Ok(rx)
    }

    fn tokenize(&self, text: &str) -> Result<Vec<u32>, ApiError> {
        self.tok
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ApiError::bad(format!("tokenizing the prompt: {e}")))
    }
}

/// Generated text so far, released in pieces that are whole characters and cannot turn out to
/// be the start of a stop string.
struct Text<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    stops: &'a [String],
    sent: usize,
}

impl<'a> Text<'a> {
    fn new(tok: &'a Tokenizer, stops: &'a [String]) -> Self {
        Text {
            tok,
            ids: vec![],
            stops,
            sent: 0,
        }
    }

    fn decode(&self) -> String {
        self.tok.decode(&self.ids, true).unwrap_or_default()
    }

    /// Adds a token: the new text that is safe to send, and whether a stop string ended it.
    fn push(&mut self, t: u32) -> (String, bool) {
        self.ids.push(t);
        let text = self.decode();
        let hit = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min();
        if let Some(at) = hit {
            return (self.take(&text, at), true);
        }
        if text.ends_with('\u{FFFD}') {
            return (String::new(), false);
        }
        // Hold back a tail that is a proper prefix of a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len()).filter(|&k| s.is_char_boundary(k) && text.ends_with(&s[..k]))
            })
            .max()
            .unwrap_or(0);
        let end = text.len() - hold;
        (self.take(&text, end), false)
    }

    /// The rest at the end.
    fn finish(&mut self) -> String {
        let text = self.decode();
        let end = text.len();
        self.take(&text, end)
    }

    fn take(&mut self, text: &str, end: usize) -> String {
        if end <= self.sent || !text.is_char_boundary(self.sent) || !text.is_char_boundary(end) {
            return String::new();
        }
        let s = text[self.sent..end].to_string();
        self.sent = end;
        s
    }
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

async fn completions(State(s): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let r: CompletionRequest = parse(&body)?;
    let prompt = match &r.prompt {
        Prompt::Text(t) => s.tokenize(t)?,
        Prompt::Ids(ids) => ids.clone(),
        Prompt::Texts(v) if v.len() == 1 => s.tokenize(&v[0])?,
        Prompt::Texts(_) => return Err(ApiError::bad("only one prompt per request is supported")),
    };
    let stream = r.stream;
    let p = s.prepare(r, prompt).await?;
    let rx = s.submit(p.req.clone())?;
    if stream {
        Ok(stream_completion(s, p, rx).into_response())
    } else {
        let (text, reason, n) = collect(&s, &p, rx).await?;
        Ok(Json(json!({
            "id": p.id, "object": "text_completion", "created": now(), "model": p.model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": reason}],
            "usage": {"prompt_tokens": p.prompt_tokens, "completion_tokens": n,
                      "total_tokens": p.prompt_tokens + n},
        }))
        .into_response())
    }
}

/// Runs a sequence to its end: text, finish reason, tokens produced.
async fn collect(
    s: &AppState,
    p: &Prepared,
    mut rx: UnboundedReceiver<Msg>,
) -> Result<(String, &'static str, usize), ApiError> {
    let mut text = Text::new(&s.tok, &p.stops);
    let mut out = String::new();
    while let Some(m) = rx.recv().await {
        match m {
            Msg::Event(Event::Token(t)) => {
                let (piece, stopped) = text.push(t);
                out += &piece;
                if stopped {
                    // Dropping the receiver takes the sequence out of the batch.
                    return Ok((out, "stop", text.ids.len()));
                }
            }
            Msg::Event(Event::Finished(f)) => {
                out += &text.finish();
                return Ok((out, finish_reason(f), text.ids.len()));
            }
            Msg::Error(e) => return Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e)),
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the batch thread stopped",
    ))
}

/// Streams the completion as server-sent events (`data: {chunk}` ..., `data: [DONE]`). When the
/// client goes away the forwarding task ends and drops its receiver, so the sequence leaves the
/// batch at the next step.
fn stream_completion(
    s: App,
    p: Prepared,
    mut rx: UnboundedReceiver<Msg>,
) -> Sse<ReceiverStream<Result<SseEvent, Infallible>>> {
    let (tx, events) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let chunk = |text: &str, reason: Option<&str>| {
            let v = json!({"id": p.id, "object": "text_completion", "created": now(),
                "model": p.model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": reason}]});
            Ok::<_, Infallible>(SseEvent::default().data(v.to_string()))
        };
        let mut text = Text::new(&s.tok, &p.stops);
        while let Some(m) = rx.recv().await {
            let (piece, reason) = match m {
                Msg::Event(Event::Token(t)) => match text.push(t) {
                    (piece, true) => (piece, Some("stop")),
                    (piece, false) => (piece, None),
                },
                Msg::Event(Event::Finished(f)) => (text.finish(), Some(finish_reason(f))),
                Msg::Error(e) => {
                    let err = json!({"error": {"message": e, "type": "server_error", "code": 500}});
                    let _ = tx.send(Ok(SseEvent::default().data(err.to_string()))).await;
                    break;
                }
            };
            if (!piece.is_empty() || reason.is_some())
                && tx.send(chunk(&piece, reason)).await.is_err()
            {
                return; // the client is gone
            }
            if reason.is_some() {
                let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(events))
}

async fn chat_completions(State(s): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let _: Value = parse(&body)?;
    Err(ApiError::bad(format!(
        "`{}` has no chat template (tokenizer_config.json): use /v1/completions",
        s.base_name
    )))
}

#[derive(Debug, Deserialize)]
struct LoadAdapter {
    lora_name: String,
    lora_path: PathBuf,
}

#[derive(Debug, Deserialize)]
struct UnloadAdapter {
    lora_name: String,
}

async fn load_adapter(State(s): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let r: LoadAdapter = parse(&body)?;
    if r.lora_name.is_empty() || r.lora_name == s.base_name {
        return Err(ApiError::bad(format!(
            "`{}` cannot name an adapter",
            r.lora_name
        )));
    }
    s.adapters
        .add(&r.lora_name, r.lora_path)
        .await
        .map_err(ApiError::bad)?;
    Ok(format!(
        "Success: LoRA adapter '{}' added successfully.",
        r.lora_name
    )
    .into_response())
}

async fn unload_adapter(State(s): State<App>, body: Bytes) -> Result<Response, ApiError> {
    let r: UnloadAdapter = parse(&body)?;
    if !s.adapters.remove(&r.lora_name) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("the adapter `{}` is not loaded", r.lora_name),
        ));
    }
    Ok(format!(
        "Success: LoRA adapter '{}' removed successfully.",
        r.lora_name
    )
    .into_response())
}
