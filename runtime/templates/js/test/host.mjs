// Stand-in for the `weir:plugin/host@0.1.1` interface the runtime gives a
// handler; tests import it by that name too, to set the config and read the
// log.

/** What `config(key)` answers: the handler's `[handler.config]` table. */
export const settings = new Map();

/** Every `log(level, message)` call, in order: `{ level, message }`. */
export const logged = [];

export function config(key) {
  return settings.get(key); // undefined when unset, like option<string>
}

export function log(level, message) {
  logged.push({ level, message });
}

/** Sets the config to `values` and forgets what was logged. */
export function reset(values = {}) {
  settings.clear();
  for (const [key, value] of Object.entries(values)) settings.set(key, value);
  logged.length = 0;
}
