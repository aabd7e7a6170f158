// The power buttons of a guest (the Guests list and a guest's own page share them).
import { api, attempt, h } from "./util.js";

export const ACTIONS = {
  start: (g) => !g.pid, stop: (g) => g.pid && !g.busy, kill: (g) => g.pid,
  pause: (g) => g.state === "running", resume: (g) => g.state === "paused", reset: (g) => g.pid,
};
const LABELS = {start: "Start", stop: "Stop", kill: "Force off", pause: "Pause",
                resume: "Resume", reset: "Reset"};

export function actionButtons(g) {
  return Object.keys(ACTIONS).map((a) => h("button", {
    "data-action": a, disabled: !ACTIONS[a](g),
    onclick: async (ev) => {
      if (a === "kill" && !confirm(`Power ${g.name} off hard?`)) return;
      ev.target.disabled = true;
      await attempt(() => api(`/api/guests/${encodeURIComponent(g.name)}/${a}`, {}));
    }}, LABELS[a]));
}
