// wsmanager.js against a live server (examples/chat/app.py under uvicorn), driven by
// tests/test_js_client.py, which passes WSM_URL (the server) and WSM_CONTROL (stop/start/kill it).
import { describe, test, after } from "node:test";
import assert from "node:assert/strict";
import wsm from "../../wsmanager/static/wsmanager.js";

const { WSManagerClient } = wsm;
const BASE = process.env.WSM_URL;
const CONTROL = process.env.WSM_CONTROL;
const ROOM = "js-room";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function control(action) {
  const response = await fetch(`${CONTROL}/${action}`, { method: "POST" });
  const body = await response.json();
  assert.ok(body.ok, `control ${action}: ${body.error}`);
}

async function login(name) {
  const response = await fetch(`${BASE}/api/login`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ name }),
  });
  assert.equal(response.status, 200);
  return (await response.json()).token;
}

async function stats() {
  const headers = process.env.WSM_ADMIN ? { Authorization: `Bearer ${process.env.WSM_ADMIN}` } : {};
  return (await fetch(`${BASE}/ws/stats`, { headers })).json();
}

async function until(what, predicate, timeout = 10000) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await predicate();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

// A client plus everything it received and every event it fired, in order.
function makeClient(token) {
  const c = new WSManagerClient(BASE.replace(/^http/, "ws") + "/ws", {
    token, minDelay: 50, maxDelay: 400, heartbeatInterval: 5000, heartbeatTimeout: 3000,
  });
  c.log = [];
  c.events = [];
  c.onmessage = (m) => c.log.push(m);
  c.onopen = () => c.events.push("open");
  c.onclose = (e) => c.events.push("close");
  c.onreconnect = () => c.events.push("reconnect");
  c.mark = () => c.log.length;
  c.seen = (since, pred) => c.log.slice(since).find(pred);
  return c;
}

describe("wsmanager.js against a live server", { concurrency: false }, () => {
  let alice;
  let bob;

  after(() => {
    alice?.close();
    bob?.close();
  });

  test("connects with the token, joins a room, and gets channel messages", async () => {
    assert.ok(BASE && CONTROL, "WSM_URL and WSM_CONTROL are set by tests/test_js_client.py");
    alice = makeClient(await login("alice"));
    bob = makeClient(await login("bob"));
    alice.join(ROOM);
    bob.join(ROOM);
    await until("hello", () => alice.seen(0, (m) => m.type === "hello" && m.user_id === "alice"));
    await until("both joined", () =>
      alice.seen(0, (m) => m.type === "presence" && m.users.length === 2));
    bob.send({ type: "message", channel: ROOM, text: "hello from bob" });
    const got = await until("bob's message", () => alice.seen(0, (m) => m.type === "message"));
    assert.deepEqual([got.from, got.text, got.channel], ["bob", "hello from bob", ROOM]);
    const s = await stats();
    assert.equal(s.total_connections, 2);
    assert.equal(s.channels[ROOM], 2);
  });

  test("the server answers the client's heartbeat, so a quiet connection stays up", async () => {
    const c = new WSManagerClient(BASE.replace(/^http/, "ws") + "/ws", {
      token: await login("carol"), heartbeatInterval: 100, heartbeatTimeout: 400, minDelay: 50,
    });
    let closes = 0;
    c.onclose = () => { closes++; };
    try {
      await until("carol connected", () => c.connected);
      await sleep(1200); // ~12 pings, each must be answered within 400 ms
      assert.equal(closes, 0);
      assert.equal(c.connections, 1);
      assert.ok(c.connected);
    } finally {
      c.close();
    }
  });

  test("reconnects after the server is killed and restarted, and resubscribes", async () => {
    const a0 = alice.mark();
    await control("restart"); // SIGKILL + start on the same port
    await until("alice reconnect", () => alice.events.includes("reconnect"));
    await until("bob reconnect", () => bob.events.includes("reconnect"));
    await until("both rejoined on the new server", async () => (await stats()).channels?.[ROOM] === 2);
    bob.send({ type: "message", channel: ROOM, text: "after the restart" });
    const got = await until("message after restart",
      () => alice.seen(a0, (m) => m.type === "message" && m.text === "after the restart"));
    assert.equal(got.from, "bob");
  });

  test("reconnects after a graceful server restart too", async () => {
    const reconnects = alice.events.filter((e) => e === "reconnect").length;
    await control("restart-graceful"); // SIGTERM: uvicorn closes the sockets itself
    await until("alice reconnect", () => alice.events.filter((e) => e === "reconnect").length > reconnects);
    await until("both rejoined", async () => (await stats()).channels?.[ROOM] === 2);
  });

  test("queues sends while the server is down and delivers them after reconnecting", async () => {
    await control("stop");
    await until("alice offline", () => !alice.connected);
    const a0 = alice.mark();
    assert.equal(alice.send({ type: "message", channel: ROOM, text: "sent while offline" }), true);
    assert.equal(alice.queued, 1);
    await sleep(200); // a few failed attempts against the closed port
    await control("start");
    // The join is re-sent before the queue is flushed, so alice gets her own room message.
    await until("queued message delivered",
      () => alice.seen(a0, (m) => m.type === "message" && m.text === "sent while offline"));
    assert.equal(alice.queued, 0);
  });

  test("close() stops reconnecting", async () => {
    await until("both connected", () => alice.connected && bob.connected);
    alice.close();
    bob.close();
    await until("server sees both gone", async () => (await stats()).total_connections === 0);
    const attempts = alice.connectAttempts + bob.connectAttempts;
    await control("restart");
    await sleep(1000);
    assert.equal(alice.connectAttempts + bob.connectAttempts, attempts, "no attempt after close()");
    assert.equal((await stats()).total_connections, 0);
    assert.equal(alice.connected, false);
  });
});
