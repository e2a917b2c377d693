//! matrix-rust-sdk, the client library under Element X, against a
//! homeserver started through `tests/harness/hs.py` (so `HS_KIND` picks
//! tessera or Synapse as for the other black-box suites).
//!
//! Two scenarios: a direct chat (invite, join, a room name the SDK computes
//! from the sync summary's heroes, messages in order, history, unread
//! counts and a read receipt), and an encrypted room where the SDK's crypto
//! machine shares Megolm keys over to-device messages both ways.
//!
//! Every wait is a bounded loop of long-polling syncs.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use matrix_sdk::config::SyncSettings;
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::api::client::account::register::v3::Request as RegisterRequest;
use matrix_sdk::ruma::api::client::filter::{FilterDefinition, RoomFilter};
use matrix_sdk::ruma::api::client::sync::sync_events::v3::Filter;
use matrix_sdk::ruma::api::client::receipt::create_receipt::v3::ReceiptType;
use matrix_sdk::ruma::api::client::room::create_room::v3::{Request as CreateRoomRequest, RoomPreset};
use matrix_sdk::ruma::api::client::uiaa::{AuthData, Dummy};
use matrix_sdk::ruma::events::receipt::ReceiptThread;
use matrix_sdk::ruma::events::room::encrypted::OriginalSyncRoomEncryptedEvent;
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::message::{MessageType, OriginalSyncRoomMessageEvent, RoomMessageEventContent};
use matrix_sdk::ruma::events::{AnySyncMessageLikeEvent, AnySyncTimelineEvent, InitialStateEvent};
use matrix_sdk::ruma::{OwnedEventId, OwnedRoomId, RoomId};
use matrix_sdk::{Client, Room, RoomDisplayName, RoomState};
use serde_json::Value;

const PASSWORD: &str = "rust-sdk-test-password";
/// Most long-polling syncs one wait makes.
const SYNC_ATTEMPTS: usize = 30;

/// A homeserver process for one test, killed when dropped.
struct Server {
    child: Child,
    base_url: String,
    dir: PathBuf,
}

impl Server {
    async fn start(name: &str) -> Server {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
        let dir = std::env::temp_dir().join(format!("tessera-rust-sdk-{name}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("work dir");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let out = Command::new("python3").arg(repo.join("tests/harness/hs.py")).args(["prepare", "--workdir"]).arg(&dir).stderr(Stdio::inherit()).output().expect("run hs.py");
        assert!(out.status.success(), "hs.py prepare failed");
        let launch: Value = serde_json::from_slice(&out.stdout).expect("launch JSON");
        let argv: Vec<String> = launch["argv"].as_array().expect("argv").iter().map(|a| a.as_str().expect("arg").to_owned()).collect();
        let log = File::create(launch["log_file"].as_str().expect("log_file")).expect("log file");
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).current_dir(launch["cwd"].as_str().expect("cwd")).stdin(Stdio::null()).stdout(log.try_clone().expect("log")).stderr(log);
        for (k, v) in launch["env"].as_object().expect("env") {
            cmd.env(k, v.as_str().expect("env value"));
        }
        let child = cmd.spawn().expect("start the homeserver");
        let mut server = Server { child, base_url: launch["base_url"].as_str().expect("base_url").to_owned(), dir };
        // A bounded readiness wait: the process needs a moment to listen.
        let deadline = Instant::now() + Duration::from_secs(launch["profile"]["ready_timeout_s"].as_u64().unwrap_or(30));
        loop {
            let probe = Client::builder().homeserver_url(&server.base_url).build().await.expect("client");
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("homeserver exited with {status}; log in {}", server.dir.display());
            }
            if probe.server_versions().await.is_ok() {
                return server;
            }
            assert!(Instant::now() < deadline, "homeserver not ready; log in {}", server.dir.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A client registered (UIA `m.login.dummy`) as a fresh user.
async fn registered(server: &Server, name: &str) -> Client {
    let client = Client::builder().homeserver_url(&server.base_url).build().await.expect("client");
    let mut req = RegisterRequest::new();
    req.username = Some(name.to_owned());
    req.password = Some(PASSWORD.to_owned());
    req.initial_device_display_name = Some("rust-sdk".to_owned());
    req.auth = Some(AuthData::Dummy(Dummy::new()));
    client.matrix_auth().register(req).await.expect("register");
    assert!(client.user_id().is_some(), "logged in after registering");
    client
}

/// Syncs `client` until `done` holds; panics after [`SYNC_ATTEMPTS`].
async fn sync_until(client: &Client, what: &str, mut done: impl FnMut(&Client) -> bool) {
    // Timelines long enough that no sync here leaves a gap.
    let mut room = RoomFilter::default();
    room.timeline.limit = Some(100u32.into());
    let mut filter = FilterDefinition::default();
    filter.room = room;
    let settings = SyncSettings::default().timeout(Duration::from_secs(2)).filter(Filter::FilterDefinition(filter));
    for _ in 0..SYNC_ATTEMPTS {
        client.sync_once(settings.clone()).await.unwrap_or_else(|e| panic!("{what}: sync failed: {e}"));
        if done(client) {
            return;
        }
    }
    panic!("{}: never saw {what}", client.user_id().map(ToString::to_string).unwrap_or_default());
}

/// Text bodies (in arrival order) and undecryptable events a client's
/// event handlers saw in one room.
#[derive(Clone, Default)]
struct Seen {
    texts: Arc<Mutex<Vec<(String, OwnedEventId)>>>,
    undecryptable: Arc<Mutex<Vec<OwnedEventId>>>,
}

impl Seen {
    fn watch(client: &Client, room_id: &RoomId) -> Seen {
        let seen = Seen::default();
        let (texts, room_id) = (seen.texts.clone(), room_id.to_owned());
        client.add_event_handler(move |ev: OriginalSyncRoomMessageEvent, room: Room| {
            let (texts, room_id) = (texts.clone(), room_id.clone());
            async move {
                if room.room_id() == room_id
                    && let MessageType::Text(text) = ev.content.msgtype
                {
                    texts.lock().expect("lock").push((text.body, ev.event_id));
                }
            }
        });
        let undecryptable = seen.undecryptable.clone();
        client.add_event_handler(move |ev: OriginalSyncRoomEncryptedEvent| {
            let undecryptable = undecryptable.clone();
            async move { undecryptable.lock().expect("lock").push(ev.event_id) }
        });
        seen
    }

    fn bodies(&self) -> Vec<String> {
        self.texts.lock().expect("lock").iter().map(|(b, _)| b.clone()).collect()
    }
}

fn room(client: &Client, room_id: &OwnedRoomId) -> Room {
    client.get_room(room_id).expect("the client knows the room")
}

/// Alice invites Bob to a room made by `request`; returns once both see
/// Bob joined.
async fn share(alice: &Client, bob: &Client, mut request: CreateRoomRequest) -> OwnedRoomId {
    let bob_id = bob.user_id().expect("bob").to_owned();
    request.invite = vec![bob_id.clone()];
    let room_id = alice.create_room(request).await.expect("create room").room_id().to_owned();
    sync_until(bob, "the invite", |c| c.get_room(&room_id).is_some_and(|r| r.state() == RoomState::Invited)).await;
    bob.join_room_by_id(&room_id).await.expect("join");
    sync_until(alice, "bob's join", |c| c.get_room(&room_id).is_some_and(|r| r.joined_members_count() == 2)).await;
    room_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_chat_with_history_unread_counts_and_receipts() {
    let server = Server::start("dm").await;
    let alice = registered(&server, "alice").await;
    let bob = registered(&server, "bob").await;
    let mut request = CreateRoomRequest::new();
    request.is_direct = true;
    request.preset = Some(RoomPreset::TrustedPrivateChat);
    let room_id = share(&alice, &bob, request).await;
    let seen = Seen::watch(&bob, &room_id);

    // An unnamed room: the SDK names it after the other member, from the
    // summary's heroes.
    sync_until(&alice, "the room summary", |_| true).await;
    let name = room(&alice, &room_id).display_name().await.expect("display name");
    assert!(matches!(&name, RoomDisplayName::Calculated(n) if n.contains("bob")), "{name:?}");

    // Twenty messages, in order, each once.
    let sent: Vec<String> = (0..20).map(|i| format!("message {i}")).collect();
    let alice_room = room(&alice, &room_id);
    for body in &sent {
        alice_room.send(RoomMessageEventContent::text_plain(body)).await.expect("send");
    }
    sync_until(&bob, "twenty messages", |_| seen.texts.lock().expect("lock").len() >= sent.len()).await;
    assert_eq!(seen.bodies(), sent);

    // History, newest first, back to the start.
    let bob_room = room(&bob, &room_id);
    let mut history = Vec::new();
    let mut from = None;
    for _ in 0..20 {
        let mut options = MessagesOptions::backward();
        options.from = from.take();
        let page = bob_room.messages(options).await.expect("messages");
        for ev in &page.chunk {
            if let Ok(AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(m))) = ev.raw().deserialize()
                && let Some(m) = m.as_original()
                && let MessageType::Text(t) = &m.content.msgtype
            {
                history.push(t.body.clone());
            }
        }
        match page.end {
            Some(end) if !page.chunk.is_empty() => from = Some(end),
            _ => break,
        }
    }
    history.reverse();
    assert_eq!(history, sent);

    // Every message notified Bob (one-to-one rule); a receipt clears them.
    sync_until(&bob, "twenty unread", |c| room(c, &room_id).unread_notification_counts().notification_count == 20).await;
    let last = seen.texts.lock().expect("lock").last().expect("a message").1.clone();
    bob_room.send_single_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, last).await.expect("receipt");
    sync_until(&bob, "nothing unread", |c| room(c, &room_id).unread_notification_counts().notification_count == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_messages_both_ways() {
    let server = Server::start("e2ee").await;
    let alice = registered(&server, "alice").await;
    let bob = registered(&server, "bob").await;
    let mut request = CreateRoomRequest::new();
    request.name = Some("secrets".to_owned());
    request.initial_state = vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any()];
    let room_id = share(&alice, &bob, request).await;
    let seen = [Seen::watch(&alice, &room_id), Seen::watch(&bob, &room_id)];
    for c in [&alice, &bob] {
        sync_until(c, "the room encrypted", |c| c.get_room(&room_id).is_some_and(|r| r.encryption_state().is_encrypted())).await;
    }
    for (i, (sender, reader)) in [(&alice, &bob), (&bob, &alice)].into_iter().enumerate() {
        let body = format!("secret {i}");
        room(sender, &room_id).send(RoomMessageEventContent::text_plain(&body)).await.expect("send encrypted");
        let seen = &seen[1 - i];
        sync_until(reader, "the decrypted message", |_| seen.bodies().contains(&body) || !seen.undecryptable.lock().expect("lock").is_empty()).await;
        assert_eq!(*seen.undecryptable.lock().expect("lock"), Vec::<OwnedEventId>::new(), "nothing left undecryptable");
        assert!(seen.bodies().contains(&body));
    }
}
