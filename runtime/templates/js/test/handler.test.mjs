// Tests of the handler in handler.js, in plain node: `npm test` (no
// component build, no Kafka). test/register.mjs maps the host import to the
// stand-in in test/host.mjs.

import assert from "node:assert/strict";
import { beforeEach, test } from "node:test";

import { logged, reset, settings } from "weir:plugin/host@0.1.1";
import { handle } from "../handler.js";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** An event as the runtime passes it (camelCase fields, bytes as Uint8Array). */
function event(payload, { eventType = "greeting.sent", attempt = 1, topic = "greetings" } = {}) {
  return {
    id: "e-1",
    eventType,
    schemaVersion: eventType ? "1" : "",
    key: undefined,
    payload: encoder.encode(payload),
    contentType: eventType ? "application/json" : "",
    headers: [],
    topic,
    partition: 0,
    offset: 0n,
    timestampMs: 0n,
    correlationId: "c-1",
    causationId: undefined,
    attempt,
  };
}

beforeEach(() => reset({ output_topic: "greetings.answered" }));

test("an event is echoed to the output topic", () => {
  const [out, ...rest] = handle(event('{"name": "Ada"}'));
  assert.equal(rest.length, 0);
  assert.equal(out.topic, "greetings.answered");
  assert.equal(out.eventType, "greeting.sent.echoed");
  assert.equal(out.contentType, "application/json");
  assert.equal(decoder.decode(out.payload), '{"name": "Ada"}');
  assert.equal(out.headers[0].key, "attempt");
  assert.equal(decoder.decode(out.headers[0].value), "1");
});

test("the fail marker is fatal", () => {
  assert.throws(() => handle(event('{"name": "FAIL"}')), {
    tag: "fatal",
    val: /FAIL/,
  });
});

test("the retry marker is retriable until succeed_on_attempt", () => {
  settings.set("succeed_on_attempt", "2");
  assert.throws(() => handle(event('{"name": "RETRY"}', { attempt: 1 })), {
    tag: "retriable",
  });
  assert.equal(logged[0].level, "warn");
  const [out] = handle(event('{"name": "RETRY"}', { attempt: 2 }));
  assert.equal(decoder.decode(out.headers[0].value), "2");
});
