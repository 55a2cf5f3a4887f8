/**
 * At most N validations talk to one registry at a time, so that a thousand Modules on one
 * registry do not open a thousand connections to it, while Modules on other registries proceed.
 */
import { parseImageReference } from '../image/reference.ts';
import type { ImageStage } from '../engine/types.ts';
import { createKeyedSemaphore } from './worker-pool.ts';

export function perRegistryLimit(stage: ImageStage, limitPerRegistry: number): ImageStage {
  const semaphore = createKeyedSemaphore(limitPerRegistry);
  return {
    async run(input) {
      let host: string;
      try {
        host = parseImageReference(input.image).domain;
      } catch {
        return stage.run(input); // the stage reports the bad reference
      }
      const release = await semaphore.acquire(host, input.signal);
      try {
        return await stage.run(input);
      } finally {
        release();
      }
    },
  };
}
