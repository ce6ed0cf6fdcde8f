/** Delivery of StoreEvents to the host's hook: a hook that throws must never break the engine's work. */
import type { StoreEvent } from './types.js';

/** Emits one event to the host. */
export type EmitEvent = (event: StoreEvent) => void;

/** Wraps the host's optional hook so that emitting is always safe. */
export function eventSink(onEvent: ((event: StoreEvent) => void) | undefined): EmitEvent {
  return (event) => {
    if (!onEvent) return;
    try {
      onEvent(event);
    } catch {
      // The hook logs and counts; its failure is not the store's.
    }
  };
}
