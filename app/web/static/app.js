// agentloop pages: confirmations, and the run page's live updates.
// Served from /static (the Content-Security-Policy allows no inline script).
// Every HTML fragment inserted here was rendered and escaped by the server.
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });

  function follow(root) {
    var url = root.getAttribute("data-live-url");
    var after = root.getAttribute("data-after") || "0";
    var state = root.getAttribute("data-state") || "";
    var pause = parseInt(root.getAttribute("data-poll"), 10) || 1000;
    var timeline = document.getElementById("timeline");
    var frozen = /[?&]before=/.test(window.location.search);
    var failures = 0;

    function indicator(text) {
      var live = document.getElementById("live");
      if (live) {
        live.textContent = text;
      }
    }

    function replaceSections(sections) {
      Object.keys(sections).forEach(function (name) {
        var section = document.getElementById(name);
        if (section) {
          section.innerHTML = sections[name];
        }
      });
    }

    // New events come as whole iteration groups. A group of the iteration the
    // timeline ends with replaces that group (it was sent again with its new
    // events); any other group is appended. A page showing an earlier stretch of
    // the timeline (?before=) keeps that stretch and updates only the sections.
    function mergeGroups(html) {
      if (!html.trim() || frozen) {
        return;
      }
      var holder = document.createElement("template");
      holder.innerHTML = html;
      Array.prototype.slice.call(holder.content.children).forEach(function (group) {
        var last = timeline.lastElementChild;
        var iteration = group.getAttribute("data-iteration");
        if (last && iteration !== null && last.getAttribute("data-iteration") === iteration) {
          var open = last.querySelector("details[open]");
          var details = group.querySelector("details");
          if (open && details) {
            details.open = true;
          }
          timeline.replaceChild(group, last);
        } else {
          timeline.appendChild(group);
        }
      });
    }

    function apply(data) {
      if (data.events) {
        mergeGroups(data.events);
      }
      after = String(data.last_event);
      if (data.sections) {
        replaceSections(data.sections);
        state = data.state;
      }
      root.setAttribute("data-status", data.status);
      root.setAttribute("data-after", after);
      return !data.terminal || data.more;
    }

    function poll() {
      var query = "?after=" + encodeURIComponent(after) + "&state=" + encodeURIComponent(state);
      fetch(url + query, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) {
            throw new Error("HTTP " + response.status);
          }
          return response.json();
        })
        .then(function (data) {
          failures = 0;
          if (apply(data)) {
            // More new events than one update carries: fetch the rest at once.
            window.setTimeout(poll, data.more ? 0 : pause);
          } else {
            indicator("finished");
          }
        })
        .catch(function () {
          failures += 1;
          indicator("reconnecting…");
          window.setTimeout(poll, Math.min(30000, pause * Math.pow(2, failures)));
        });
    }

    window.setTimeout(poll, pause);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("run");
    if (root && root.getAttribute("data-active") === "1") {
      follow(root);
    }
  });
})();

// The runs list: re-rendered by the server when a run, a count or the no-worker
// warning changed (and now and then, so ages move). Without JavaScript the page
// is the same list, as of its loading.
(function () {
  "use strict";

  function followList(root) {
    var url = root.getAttribute("data-live-url");
    var state = root.getAttribute("data-state") || "";
    var pause = parseInt(root.getAttribute("data-poll"), 10) || 3000;
    var section = document.getElementById("runs-section");
    var live = document.getElementById("list-live");
    var failures = 0;
    var separator = url.indexOf("?") === -1 ? "?" : "&";

    function poll() {
      fetch(url + separator + "state=" + encodeURIComponent(state), {
        headers: { Accept: "application/json" },
        credentials: "same-origin"
      })
        .then(function (response) {
          if (!response.ok) {
            throw new Error("HTTP " + response.status);
          }
          return response.json();
        })
        .then(function (data) {
          failures = 0;
          live.textContent = "live";
          if (data.html !== undefined) {
            section.innerHTML = data.html;
          }
          state = data.state;
          root.setAttribute("data-state", state);
          window.setTimeout(poll, pause);
        })
        .catch(function () {
          failures += 1;
          live.textContent = "reconnecting…";
          window.setTimeout(poll, Math.min(60000, pause * Math.pow(2, failures)));
        });
    }

    live.hidden = false;
    window.setTimeout(poll, pause);
  }

  // A flash about the decision just made ("The run resumes.") stops being true
  // when the live page sees the run end: take it away then.
  function dropFlashesWhenTheRunEnds(run) {
    var observer = new MutationObserver(function () {
      var status = run.getAttribute("data-status");
      if (["queued", "running", "paused"].indexOf(status) === -1) {
        document.querySelectorAll(".flash:not(.flash-error)").forEach(function (flash) {
          flash.remove();
        });
        observer.disconnect();
      }
    });
    observer.observe(run, { attributes: true, attributeFilter: ["data-status"] });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("runs-list");
    if (root) {
      followList(root);
    }
    var run = document.getElementById("run");
    if (run && run.getAttribute("data-active") === "1") {
      dropFlashesWhenTheRunEnds(run);
    }
  });
})();
