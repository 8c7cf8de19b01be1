// Echo in JavaScript: the `fail-on-marker` handler, a component built with
// componentize-js (StarlingMonkey): see the README for the build line.
//
// Publishes every event to the topic in the `output_topic` config (default
// `<topic>.out`) with the same key and payload; an enveloped input becomes an
// envelope of type `<event-type>.echoed` in the same content type, a raw
// input is echoed raw. Each output carries the attempt that produced it in
// an `attempt` header.
//
// A payload containing the `marker` config (default `FAIL`) fails fatally
// (the event goes to the dead-letter topic); one containing `retry_marker`
// (default `RETRY`) fails retriably until the attempt `succeed_on_attempt`
// (default: never).
//
// WIT to JS: records have camelCase fields, `list<u8>` is a Uint8Array,
// `option<T>` is T or undefined, a variant is `{ tag, val }`, and throwing a
// variant value from `handle` returns it as the `err` of its result.

import { config, log } from "weir:plugin/host@0.1.1";

const encoder = new TextEncoder();

function setting(key, fallback) {
  const value = config(key);
  return value === undefined ? fallback : value;
}

function contains(haystack, needle) {
  if (needle === "") return false;
  const n = encoder.encode(needle);
  outer: for (let i = 0; i + n.length <= haystack.length; i++) {
    for (let j = 0; j < n.length; j++) {
      if (haystack[i + j] !== n[j]) continue outer;
    }
    return true;
  }
  return false;
}

export function handle(event) {
  const marker = setting("marker", "FAIL");
  if (contains(event.payload, marker)) {
    throw { tag: "fatal", val: `event ${event.id} carries the marker "${marker}"` };
  }
  const succeedOn = Number.parseInt(setting("succeed_on_attempt", "0"), 10) || 0;
  if (
    contains(event.payload, setting("retry_marker", "RETRY")) &&
    (succeedOn === 0 || event.attempt < succeedOn)
  ) {
    log("warn", `event ${event.id} fails on attempt ${event.attempt}`);
    throw {
      tag: "retriable",
      val: `event ${event.id} carries the retry marker (attempt ${event.attempt})`,
    };
  }
  const enveloped = event.eventType !== "";
  return [
    {
      topic: setting("output_topic", `${event.topic}.out`),
      key: event.key,
      eventType: enveloped ? `${event.eventType}.echoed` : "",
      schemaVersion: "",
      contentType: enveloped ? event.contentType : "",
      payload: event.payload,
      headers: [{ key: "attempt", value: encoder.encode(String(event.attempt)) }],
    },
  ];
}
