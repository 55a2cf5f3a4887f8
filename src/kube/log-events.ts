/** Events of stand-alone mode, which has no cluster to keep them in. */
import type { Logger } from 'pino';
import type { EventRecorder } from '../controller/controller.ts';

/** Stand-alone mode has no cluster to keep events in: they go to the log. */
export function logEventRecorder(logger: Logger): EventRecorder {
  return {
    record(object, type, reason, message) {
      logger.info({ object: object.metadata.name, kind: object.kind, type, reason }, message);
    },
  };
}
