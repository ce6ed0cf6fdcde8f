/**
 * What the block store reports (StoreOptions.onEvent) becomes log lines and Prometheus metrics: a failed
 * compaction is a warning and a counted failure; the space reserve given back on a full disk is a warning.
 */
import { Counter, type Registry } from 'prom-client';
import type { StoreEvent } from '../storage-engine/index.js';
import type { Logger } from './logging.js';

/** The store's event hook for this driver: logs each event and counts it in `registry`. */
export function storeEventReporter(logger: Logger, registry: Registry): (event: StoreEvent) => void {
  const compactionFailures = new Counter({
    name: 'cbt_csi_compaction_failures_total',
    help: 'Background compaction passes that failed (they are retried), by reason: no_space or error',
    labelNames: ['reason'] as const,
    registers: [registry],
  });
  const reserveReleases = new Counter({
    name: 'cbt_csi_space_reserve_released_total',
    help: 'Times the store gave back its space reserve so a delete could commit on a full state disk',
    registers: [registry],
  });
  // Both series exist from the start, so an alert on their increase needs no first failure to see them.
  compactionFailures.inc({ reason: 'no_space' }, 0);
  compactionFailures.inc({ reason: 'error' }, 0);
  return (event) => {
    switch (event.type) {
      case 'compaction-failed':
        compactionFailures.inc({ reason: event.noSpace ? 'no_space' : 'error' });
        logger.warn(
          { err: event.error.message, noSpace: event.noSpace, failures: event.failures, retryInMs: event.retryInMs },
          event.noSpace
            ? 'compaction failed: the state disk is full; hidden layers keep their space until it succeeds'
            : 'compaction failed',
        );
        return;
      case 'compaction-recovered':
        logger.info({ failures: event.failures }, 'compaction succeeded after failing');
        return;
      case 'space-reserve-released':
        reserveReleases.inc();
        logger.warn(
          { bytes: event.bytes, for: event.for },
          'the state disk is full: gave back the space reserve so a delete could commit',
        );
        return;
      case 'space-reserve-restored':
        logger.info({ bytes: event.bytes }, 'space reserve in place');
        return;
    }
  };
}
