/** Acceptance: the real kubectl against the real server over TLS, on the embedded SQLite store. */
import t from 'tap';
import { kubectlAcceptance } from './kubectl-acceptance.ts';

kubectlAcceptance(t, async () => []);
