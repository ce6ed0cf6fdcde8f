/** What every CSI service adapter is given: the store, the configuration, a logger. */
import type { BlockStore } from '../../storage-engine/index.js';
import type { DriverConfig } from '../config.js';
import type { Logger } from '../logging.js';

export interface DriverContext {
  readonly store: BlockStore;
  readonly config: DriverConfig;
  readonly logger: Logger;
  /** False while starting or draining. */
  isReady(): boolean;
}
