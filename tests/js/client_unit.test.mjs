// Unit tests of wsmanager.js against an in-memory WebSocket (no server): backoff, token, queue,
// heartbeat, ping answers, close(). The live behaviour is in client_live.test.mjs.
import test from "node:test";
import assert from "node:assert/strict";
import wsm from "../../wsmanager/static/wsmanager.js";

const { WSManagerClient, backoffDelay } = wsm;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A scripted stand-in for the WebSocket constructor: records every instance.
function fakeSocketClass() {
  const sockets = [];
  class FakeSocket {
    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
    }
    send(data) {
      if (this.readyState !== 1) throw new Error("not open");
      this.sent.push(typeof data === "string" ? JSON.parse(data) : data);
    }
    close(code, reason) {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.closedWith = { code, reason };
      setTimeout(() => this.onclose && this.onclose({ code: code || 1005, reason: reason || "", wasClean: true }), 0);
    }
    // test helpers
    open() { this.readyState = 1; this.onopen && this.onopen({}); }
    receive(obj) { this.onmessage && this.onmessage({ data: JSON.stringify(obj) }); }
    drop(code = 1006) { this.readyState = 3; this.onclose && this.onclose({ code, reason: "", wasClean: false }); }
  }
  return { FakeSocket, sockets };
}

test("backoff is full jitter under an exponential ceiling with a cap", () => {
  const opts = { minDelay: 100, maxDelay: 1000, factor: 2 };
  assert.equal(backoffDelay(0, opts, () => 0), 0);
  assert.equal(backoffDelay(0, opts, () => 0.999999), 99);
  assert.equal(backoffDelay(2, opts, () => 0.999999), 399);
  assert.equal(backoffDelay(10, opts, () => 0.999999), 999); // capped
  for (let attempt = 0; attempt < 20; attempt++) {
    const d = backoffDelay(attempt, opts);
    assert.ok(d >= 0 && d < Math.min(1000, 100 * 2 ** attempt), `attempt ${attempt}: ${d}`);
  }
});

test("token and params go in the query string", () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  const c = new WSManagerClient("ws://h:1/ws?x=1", { WebSocket: FakeSocket, token: "a b&c", params: { room: "r" } });
  assert.equal(sockets[0].url, "ws://h:1/ws?x=1&room=r&token=a%20b%26c");
  c.close();
  const c2 = new WSManagerClient("http://h:1/ws", { WebSocket: FakeSocket, token: () => "t2", tokenParam: "auth" });
  assert.equal(sockets[1].url, "ws://h:1/ws?auth=t2");
  c2.close();
});

test("answers the server's JSON ping and hides heartbeats from onmessage", () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  const c = new WSManagerClient("ws://h/ws", { WebSocket: FakeSocket, heartbeatInterval: 0 });
  const seen = [];
  c.onmessage = (m) => seen.push(m);
  sockets[0].open();
  sockets[0].receive({ type: "ping" });
  sockets[0].receive({ type: "connection_established", user_id: "u" });
  sockets[0].receive({ type: "chat", text: "hi" });
  assert.deepEqual(sockets[0].sent, [{ type: "pong" }]);
  assert.deepEqual(seen.map((m) => m.type), ["connection_established", "chat"]);
  assert.equal(c.greeting.user_id, "u");
  c.close();
});

test("offline sends are queued, bounded (oldest dropped) and flushed after resubscribing", () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  const c = new WSManagerClient("ws://h/ws", { WebSocket: FakeSocket, maxQueue: 3, heartbeatInterval: 0 });
  const dropped = [];
  c.on("drop", (m) => dropped.push(m.n));
  c.join("room1");
  for (let n = 1; n <= 5; n++) assert.equal(c.send({ n }), true);
  assert.equal(c.queued, 3);
  assert.deepEqual(dropped, [1, 2]);
  assert.equal(c.dropped, 2);
  sockets[0].open();
  assert.deepEqual(sockets[0].sent, [{ type: "join", channel: "room1" }, { n: 3 }, { n: 4 }, { n: 5 }]);
  assert.equal(c.queued, 0);
  c.close();
});

test("maxQueue 0 refuses offline sends", () => {
  const { FakeSocket } = fakeSocketClass();
  const c = new WSManagerClient("ws://h/ws", { WebSocket: FakeSocket, maxQueue: 0 });
  assert.equal(c.send({ a: 1 }), false);
  c.close();
});

test("reconnects after a drop, resubscribes, fires onreconnect; close() stops for good", async () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  const events = [];
  const c = new WSManagerClient("ws://h/ws", { WebSocket: FakeSocket, minDelay: 5, maxDelay: 20, heartbeatInterval: 0 });
  c.onopen = () => events.push("open");
  c.onclose = (e) => events.push("close:" + e.willReconnect);
  c.onreconnecting = (e) => events.push("reconnecting:" + e.attempt);
  c.onreconnect = (e) => events.push("reconnect:" + e.attempts);
  c.join("a");
  c.join("b");
  c.leave("a");
  sockets[0].open();
  sockets[0].drop();
  assert.equal(c.connected, false);
  await sleep(40);
  assert.equal(sockets.length, 2);
  sockets[1].open();
  assert.deepEqual(sockets[1].sent, [{ type: "join", channel: "b" }]);
  assert.deepEqual(events, ["open", "close:true", "reconnecting:1", "open", "reconnect:1"]);
  c.close();
  await sleep(40);
  assert.equal(sockets.length, 2, "no new socket after close()");
  assert.equal(sockets[1].closedWith.code, 1000);
  c.connect();
  assert.equal(sockets.length, 3, "connect() starts again");
  c.close();
});

test("a silent connection is dropped by the heartbeat timeout and reconnected", async () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  const c = new WSManagerClient("ws://h/ws", {
    WebSocket: FakeSocket, heartbeatInterval: 20, heartbeatTimeout: 20, minDelay: 1, maxDelay: 2,
  });
  sockets[0].open();
  await sleep(30);
  assert.equal(sockets[0].sent[0].type, "ping");
  sockets[0].receive({ type: "pong" }); // answered: stays up
  await sleep(25);
  assert.equal(sockets.length, 1);
  await sleep(60); // pings go unanswered now
  assert.ok(sockets.length >= 2, "dropped and reconnecting");
  assert.equal(sockets[0].closedWith.code, 4000);
  c.close();
});

test("gives up after maxRetries failed attempts", async () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  let gaveUp = null;
  const c = new WSManagerClient("ws://h/ws", { WebSocket: FakeSocket, minDelay: 1, maxDelay: 2, maxRetries: 2 });
  c.on("giveup", (e) => { gaveUp = e.attempts; });
  sockets[0].drop();
  await sleep(20);
  sockets[1].drop();
  await sleep(20);
  sockets[2].drop();
  await sleep(20);
  assert.equal(sockets.length, 3);
  assert.equal(gaveUp, 2);
  c.close();
});

test("an exception in a handler does not break the client", async () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  const logged = [];
  const logger = { debug() {}, error: (...args) => logged.push(args[1].message) };
  const c = new WSManagerClient("ws://h/ws", { WebSocket: FakeSocket, heartbeatInterval: 0, logger });
  const seen = [];
  c.on("message", () => { throw new Error("handler bug"); });
  c.on("message", (m) => seen.push(m.n));
  sockets[0].open();
  sockets[0].receive({ n: 1 });
  sockets[0].receive({ n: 2 });
  assert.deepEqual(seen, [1, 2]);
  assert.deepEqual(logged, ["handler bug", "handler bug"]);
  c.close();
});

test("a relative URL outside a page is refused at once", () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  assert.throws(() => new WSManagerClient("/ws", { WebSocket: FakeSocket }), /relative URL/);
  assert.equal(sockets.length, 0);
});

test("binary and non-JSON text reach onmessage as they are; sends are encoded by type", () => {
  const { FakeSocket, sockets } = fakeSocketClass();
  const c = new WSManagerClient("ws://h/ws", { WebSocket: FakeSocket, heartbeatInterval: 0 });
  const seen = [];
  c.onmessage = (m) => seen.push(m);
  sockets[0].open();
  const buf = new Uint8Array([1, 2, 3]).buffer;
  sockets[0].onmessage({ data: buf });
  sockets[0].onmessage({ data: "plain text" });
  assert.equal(seen[0], buf);
  assert.equal(seen[1], "plain text");
  assert.equal(sockets[0].binaryType, "arraybuffer");
  const raw = [];
  sockets[0].send = (d) => raw.push(d);
  c.send({ a: 1 });
  c.send("text");
  c.send(buf);
  assert.deepEqual(raw, ['{"a":1}', "text", buf]);
  c.close();
});
