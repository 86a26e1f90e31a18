/*! wsmanager.js — the browser/node client for wsmanager servers. No dependencies.
 *
 * Usable three ways:
 *   <script src="/wsmanager/wsmanager.js"></script>   -> window.WSManagerClient
 *   const { WSManagerClient } = require("./wsmanager.js")       (CommonJS)
 *   import wsm from "./wsmanager.js"; const { WSManagerClient } = wsm;   (node ESM)
 *
 * What it does beyond a bare WebSocket (options and events: README.md, "The JS client"):
 *   - reconnects with exponential backoff, full jitter, and a cap;
 *   - answers the server's JSON {"type":"ping"} with {"type":"pong"};
 *   - sends its own {"type":"ping"} every heartbeatInterval and drops the socket when nothing at
 *     all arrives within heartbeatTimeout afterwards (a half-open TCP connection never closes by
 *     itself);
 *   - queues send() calls while offline (bounded: the oldest message is dropped when full) and
 *     flushes them, in order, after the channel subscriptions are restored on reconnect;
 *   - onopen / onmessage / onclose / onreconnect (+ on(type, fn) for several listeners);
 *   - close() stops reconnecting for good; connect() starts again.
 */
(function (root, factory) {
  "use strict";
  var api = factory();
  if (typeof module === "object" && module && module.exports) {
    module.exports = api;
  } else if (root) {
    root.WSManagerClient = api.WSManagerClient;
  }
})(typeof globalThis !== "undefined" ? globalThis : typeof self !== "undefined" ? self : this, function () {
  "use strict";

  var OPEN = 1;

  var DEFAULTS = {
    token: null,               // string, or function returning a string (called on every connect)
    tokenParam: "token",       // query-string name of the token
    params: null,              // extra query-string parameters {name: value}
    protocols: undefined,      // WebSocket subprotocols
    binaryType: "arraybuffer", // binary messages as ArrayBuffer (browsers default to Blob)
    minDelay: 500,             // ms, base of the backoff
    maxDelay: 30000,           // ms, cap of the backoff
    factor: 2,                 // backoff growth per failed attempt
    maxRetries: Infinity,      // consecutive failed attempts before giving up
    heartbeatInterval: 25000,  // ms between client pings; 0 disables the heartbeat
    heartbeatTimeout: 10000,   // ms to wait for any inbound message after a ping
    connectTimeout: 10000,     // ms for the opening handshake; 0 disables
    maxQueue: 100,             // messages kept while offline; 0 disables queueing
    autoConnect: true,
    answerPings: true,         // reply {"type":"pong"} to the server's {"type":"ping"}
    deliverHeartbeats: false,  // also pass ping/pong messages to onmessage
    joinMessage: function (channel) { return { type: "join", channel: channel }; },
    leaveMessage: function (channel) { return { type: "leave", channel: channel }; },
    shouldReconnect: function (closeEvent) { return true; },
    WebSocket: null,           // constructor to use instead of the global WebSocket
    random: Math.random,       // injectable for tests
    logger: null               // e.g. console: debug(...) for the lifecycle, error(...) for handler errors
  };

  function now() {
    return Date.now();
  }

  /* Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): a uniform draw in
   * [0, min(cap, base * factor^attempt)], so a crowd of clients reconnecting after a server
   * restart spreads over the whole window instead of arriving in waves. */
  function backoffDelay(attempt, opts, random) {
    var base = opts.minDelay, cap = opts.maxDelay, factor = opts.factor || 2;
    var ceiling = Math.min(cap, base * Math.pow(factor, Math.max(0, attempt)));
    return Math.floor((random || Math.random)() * ceiling);
  }

  function resolveUrl(url) {
    if (/^wss?:\/\//i.test(url)) return url;
    if (/^https?:\/\//i.test(url)) return url.replace(/^http/i, "ws");
    if (typeof location !== "undefined" && location && location.host) {
      var scheme = location.protocol === "https:" ? "wss://" : "ws://";
      if (url.charAt(0) !== "/") url = "/" + url;
      return scheme + location.host + url;
    }
    throw new Error("wsmanager: a relative URL needs a page location: " + url);
  }

  function withQuery(url, params) {
    var parts = [];
    for (var key in params) {
      if (!Object.prototype.hasOwnProperty.call(params, key)) continue;
      var value = params[key];
      if (value === null || value === undefined) continue;
      parts.push(encodeURIComponent(key) + "=" + encodeURIComponent(String(value)));
    }
    if (!parts.length) return url;
    var hash = "";
    var i = url.indexOf("#");
    if (i >= 0) { hash = url.slice(i); url = url.slice(0, i); }
    return url + (url.indexOf("?") >= 0 ? "&" : "?") + parts.join("&") + hash;
  }

  function WSManagerClient(url, options) {
    if (!(this instanceof WSManagerClient)) return new WSManagerClient(url, options);
    var opts = {};
    var k;
    for (k in DEFAULTS) opts[k] = DEFAULTS[k];
    if (options) for (k in options) if (options[k] !== undefined) opts[k] = options[k];
    resolveUrl(url); // a bad URL is a programming error: throw now, not on every retry
    this.url = url;
    this.options = opts;
    this.ws = null;
    this.attempt = 0;            // consecutive failed attempts since the last open
    this.connections = 0;        // sockets opened so far
    this.connectAttempts = 0;    // sockets created so far
    this.dropped = 0;            // queued messages dropped because the queue was full
    this.greeting = null;        // the last {"type":"connection_established"} seen
    this._queue = [];
    this._channels = new Set();
    this._listeners = {};
    this._stopped = true;
    this._everOpened = false;
    this._reconnectTimer = null;
    this._heartbeatTimer = null;
    this._deadTimer = null;
    this._connectTimer = null;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onreconnect = null;
    this.onreconnecting = null;
    this.onerror = null;
    if (opts.autoConnect) this.connect();
  }

  WSManagerClient.backoffDelay = backoffDelay;
  WSManagerClient.version = "0.1.0";

  var proto = WSManagerClient.prototype;

  Object.defineProperty(proto, "connected", {
    get: function () { return !!this.ws && this.ws.readyState === OPEN; }
  });
  Object.defineProperty(proto, "readyState", {
    get: function () { return this.ws ? this.ws.readyState : 3; }
  });
  Object.defineProperty(proto, "channels", {
    get: function () { return Array.from(this._channels); }
  });
  Object.defineProperty(proto, "queued", {
    get: function () { return this._queue.length; }
  });

  proto._log = function () {
    var logger = this.options.logger;
    if (logger && logger.debug) logger.debug.apply(logger, ["[wsmanager]"].concat([].slice.call(arguments)));
  };

  /* Listeners: on(type, fn) returns a function that removes fn; the on<type> property is called
   * too. Types: open, message, close, reconnect, reconnecting, error, drop, giveup. */
  proto.on = function (type, fn) {
    var list = this._listeners[type] || (this._listeners[type] = []);
    list.push(fn);
    var self = this;
    return function () { self.off(type, fn); };
  };
  proto.addEventListener = proto.on;
  proto.off = function (type, fn) {
    var list = this._listeners[type];
    if (!list) return;
    var i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
  };
  proto.removeEventListener = proto.off;

  proto._emit = function (type) {
    var args = [].slice.call(arguments, 1);
    var handlers = [];
    var prop = this["on" + type];
    if (typeof prop === "function") handlers.push(prop);
    var list = this._listeners[type];
    if (list) handlers = handlers.concat(list);
    for (var i = 0; i < handlers.length; i++) {
      try {
        handlers[i].apply(this, args);
      } catch (err) {
        // A faulty handler must not break the connection logic: log it, or rethrow it
        // asynchronously so it still shows up as an uncaught error.
        var logger = this.options.logger;
        if (logger && logger.error) logger.error("[wsmanager] error in a " + type + " handler:", err);
        else setTimeout(function () { throw err; }, 0);
      }
    }
  };

  proto._buildUrl = function () {
    var params = {};
    var extra = this.options.params;
    if (extra) for (var key in extra) params[key] = extra[key];
    var token = this.options.token;
    if (typeof token === "function") token = token();
    if (token !== null && token !== undefined && token !== "") params[this.options.tokenParam] = token;
    return withQuery(resolveUrl(this.url), params);
  };

  /* Starts (or restarts after close()) connecting. Idempotent while a socket is live. */
  proto.connect = function () {
    this._stopped = false;
    if (this.ws && (this.ws.readyState === 0 || this.ws.readyState === OPEN)) return this;
    this._clearReconnect();
    this._open();
    return this;
  };

  proto._open = function () {
    var Ctor = this.options.WebSocket || (typeof WebSocket !== "undefined" ? WebSocket : null);
    if (!Ctor) throw new Error("wsmanager: no WebSocket implementation (node 20: run with --experimental-websocket, or pass options.WebSocket)");
    var self = this;
    var ws;
    this.connectAttempts++;
    try {
      ws = this.options.protocols !== undefined ? new Ctor(this._buildUrl(), this.options.protocols) : new Ctor(this._buildUrl());
    } catch (err) {
      this._emit("error", err);
      this._scheduleReconnect(null);
      return;
    }
    this.ws = ws;
    if (this.options.binaryType) ws.binaryType = this.options.binaryType;
    var opened = false;
    if (this.options.connectTimeout > 0) {
      this._connectTimer = setTimeout(function () {
        self._connectTimer = null;
        if (self.ws === ws && !opened) {
          self._log("handshake timed out");
          self._drop(ws, { code: 4000, reason: "connect timeout", wasClean: false });
        }
      }, this.options.connectTimeout);
    }
    ws.onopen = function (event) {
      if (self.ws !== ws) return;
      opened = true;
      self._clearConnectTimer();
      var reconnected = self._everOpened;
      var attempts = self.attempt;
      self._everOpened = true;
      self.attempt = 0;
      self.connections++;
      self._startHeartbeat();
      // Subscriptions first, then what was queued: a queued message to a channel must not
      // arrive before the server knows we are in it again.
      self._channels.forEach(function (channel) {
        self._rawSend(self.options.joinMessage(channel));
      });
      self._flush();
      self._emit("open", event);
      if (reconnected) self._emit("reconnect", { attempts: attempts, connections: self.connections });
    };
    ws.onmessage = function (event) {
      if (self.ws !== ws) return;
      self._alive();
      var data = event.data;
      var parsed = data;
      if (typeof data === "string") {
        try { parsed = JSON.parse(data); } catch (e) { parsed = data; }
      }
      if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) {
        if (parsed.type === "ping" && self.options.answerPings) {
          self._rawSend({ type: "pong" });
          if (!self.options.deliverHeartbeats) return;
        } else if (parsed.type === "pong" && !self.options.deliverHeartbeats) {
          return;
        } else if (parsed.type === "connection_established") {
          self.greeting = parsed;
        }
      }
      self._emit("message", parsed, event);
    };
    ws.onerror = function (event) {
      if (self.ws !== ws) return;
      self._emit("error", event);
      // Node 20's WebSocket (undici) fires no close event after a refused connection, so a
      // failed handshake is handled here; browsers send close right after and it is ignored.
      var failed = { code: 1006, reason: "connection failed", wasClean: false };
      if (!opened) {
        self._drop(ws, failed);
      } else {
        setTimeout(function () {
          if (self.ws === ws && ws.readyState !== OPEN) self._drop(ws, failed);
        }, 1000);
      }
    };
    ws.onclose = function (event) {
      if (self.ws !== ws) return;
      self._drop(ws, event);
    };
  };

  /* Forget a socket (closed by the peer, dead, or timed out) and decide about reconnecting. */
  proto._drop = function (ws, event) {
    if (this.ws !== ws) return;
    this.ws = null;
    this._stopHeartbeat();
    this._clearConnectTimer();
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
    if (ws.readyState === 0 || ws.readyState === OPEN) {
      try { ws.close(4000, "client gave up on this connection"); } catch (e) { /* already closing */ }
    }
    var info = {
      code: event && event.code, reason: event && event.reason,
      wasClean: !!(event && event.wasClean), willReconnect: false
    };
    var reconnect = !this._stopped && this.options.shouldReconnect(info);
    info.willReconnect = reconnect && this.attempt < this.options.maxRetries;
    this._emit("close", info);
    if (reconnect) this._scheduleReconnect(info);
  };

  proto._scheduleReconnect = function (info) {
    if (this._stopped || this._reconnectTimer) return;
    if (this.attempt >= this.options.maxRetries) {
      this._stopped = true;
      this._emit("giveup", { attempts: this.attempt });
      return;
    }
    var delay = backoffDelay(this.attempt, this.options, this.options.random);
    this.attempt++;
    var self = this;
    this._log("reconnecting in", delay, "ms (attempt", this.attempt + ")");
    this._emit("reconnecting", { attempt: this.attempt, delay: delay, lastClose: info });
    this._reconnectTimer = setTimeout(function () {
      self._reconnectTimer = null;
      if (!self._stopped) self._open();
    }, delay);
  };

  proto._clearReconnect = function () {
    if (this._reconnectTimer) { clearTimeout(this._reconnectTimer); this._reconnectTimer = null; }
  };
  proto._clearConnectTimer = function () {
    if (this._connectTimer) { clearTimeout(this._connectTimer); this._connectTimer = null; }
  };

  proto._startHeartbeat = function () {
    this._stopHeartbeat();
    var interval = this.options.heartbeatInterval;
    if (!(interval > 0)) return;
    var self = this;
    var ws = this.ws;
    this._heartbeatTimer = setInterval(function () {
      if (self.ws !== ws || ws.readyState !== OPEN) return;
      self._rawSend({ type: "ping", ts: now() });
      if (!self._deadTimer && self.options.heartbeatTimeout > 0) {
        self._deadTimer = setTimeout(function () {
          self._deadTimer = null;
          if (self.ws === ws) {
            self._log("no answer to heartbeat: dropping the connection");
            self._drop(ws, { code: 4001, reason: "heartbeat timeout", wasClean: false });
          }
        }, self.options.heartbeatTimeout);
      }
    }, interval);
  };

  proto._alive = function () {
    if (this._deadTimer) { clearTimeout(this._deadTimer); this._deadTimer = null; }
  };

  proto._stopHeartbeat = function () {
    if (this._heartbeatTimer) { clearInterval(this._heartbeatTimer); this._heartbeatTimer = null; }
    this._alive();
  };

  function encode(message) {
    if (typeof message === "string") return message;
    if (message instanceof ArrayBuffer || ArrayBuffer.isView(message)) return message;
    if (typeof Blob !== "undefined" && message instanceof Blob) return message;
    return JSON.stringify(message);
  }

  proto._rawSend = function (message) {
    if (!this.ws || this.ws.readyState !== OPEN) return false;
    try {
      this.ws.send(encode(message));
      return true;
    } catch (err) {
      this._emit("error", err);
      return false;
    }
  };

  proto._flush = function () {
    while (this._queue.length && this.ws && this.ws.readyState === OPEN) {
      if (!this._rawSend(this._queue[0])) break;
      this._queue.shift();
    }
  };

  /* Sends now when open, else queues (bounded, oldest dropped first). Objects and arrays are
   * JSON; strings are text frames; ArrayBuffer/typed arrays/Blob are binary.
   * Returns true when sent or queued, false when it could not be kept. */
  proto.send = function (message) {
    if (this.connected) {
      this._flush();
      if (!this._queue.length && this._rawSend(message)) return true;
    }
    if (!(this.options.maxQueue > 0)) return false;
    this._queue.push(message);
    while (this._queue.length > this.options.maxQueue) {
      var lost = this._queue.shift();
      this.dropped++;
      this._emit("drop", lost);
    }
    return true;
  };

  /* Channel subscriptions are remembered and re-sent on every reconnect. */
  proto.join = function (channel) {
    if (this._channels.has(channel)) return false;
    this._channels.add(channel);
    this._rawSend(this.options.joinMessage(channel));
    return true;
  };

  proto.leave = function (channel) {
    if (!this._channels.delete(channel)) return false;
    this._rawSend(this.options.leaveMessage(channel));
    return true;
  };

  /* Closes and stops reconnecting; the send queue is kept for a later connect(). */
  proto.close = function (code, reason) {
    this._stopped = true;
    this._clearReconnect();
    this._stopHeartbeat();
    this._clearConnectTimer();
    var ws = this.ws;
    if (!ws) return;
    this.ws = null;
    ws.onopen = ws.onmessage = ws.onerror = null;
    var self = this;
    ws.onclose = function (event) {
      ws.onclose = null;
      self._emit("close", { code: event.code, reason: event.reason, wasClean: event.wasClean, willReconnect: false });
    };
    try {
      ws.close(code || 1000, reason || "");
    } catch (err) {
      try { ws.close(); } catch (e) { /* nothing more to do */ }
    }
  };

  return { WSManagerClient: WSManagerClient, backoffDelay: backoffDelay, default: WSManagerClient };
});
