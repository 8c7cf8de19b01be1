// Loaded before the tests (`node --import ./test/register.mjs --test`):
// makes the `weir:plugin/host@0.1.1` import of handler.js, which only a
// componentize-js build provides, resolve to the stand-in in host.mjs.
//
// This file is also the hooks module it registers: node runs the hooks on
// their own thread, where only `resolve` is used.

import { register } from "node:module";
import { isMainThread } from "node:worker_threads";

const HOST = "weir:plugin/host@0.1.1";

export async function resolve(specifier, context, next) {
  if (specifier === HOST) {
    return { url: new URL("./host.mjs", import.meta.url).href, shortCircuit: true };
  }
  return next(specifier, context);
}

if (isMainThread) {
  register(import.meta.url);
}
