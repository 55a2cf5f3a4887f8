/** Acceptance: no acknowledged write lost to kill -9, and 10,000 module statuses, on the embedded SQLite store. */
import t from 'tap';
import { durabilityAcceptance } from './durability-acceptance.ts';

durabilityAcceptance(t, async () => []);
